-- Reliable pop: reap expired leases and due delayed messages, then lease messages.
-- KEYS: 1 ready (LIST: each frame behind its head), 2 leases (ZSET lease -> deadline ms),
--       3 inflight (HASH: leases stored by older versions, read only when they expire),
--       4 acks (HASH lease -> u16 count, u16 settled, bitmap), 5 delayed (ZSET envelope ->
--       due ms), 6 dead (LIST of envelopes), 7 ready count (STRING: messages in 1),
--       8 this lease's list (the leased frames, each behind its head where it had one;
--       every lease's list is named like it, the lease id last)
-- ARGV: 1 messages wanted, 2 lease ms, 3 max attempts, 4 reap limit, 5 lease id (chosen
--       by the client: 128 random bits, so no two leases ever share a name, not even
--       across a failover that lost the last writes), 6 most bytes to lease (at least one
--       frame is taken)
-- Returns {leased (0/1), deadline ms, reaped, messages leased, elements in KEYS[8]}; the
-- client reads KEYS[8] right behind this call (LRANGE, same connection).
--
-- Every shard key but the ready list always exists (a KEEP member, never removed): in a
-- slot that is being migrated, Redis serves a multi-key script only when all of its keys
-- are on the node, and answers TRYAGAIN for as long as some exist and others do not. The
-- lease's own list never exists before this call, so a migrating shard leases nothing
-- (TRYAGAIN: the consumer skips the shard for a round) until its slot has moved.
local now = server_ms()
local limit = tonumber(ARGV[4])
local max_attempts = tonumber(ARGV[3])
local MAX_LEASE = 16384
local MAX_FRAMES = 256
-- Most pieces one frame is cut into for leases that ask much less than it holds.
local MAX_PIECES = 64

redis.call('ZADD', KEYS[2], 'NX', '+inf', KEEP)
redis.call('HSETNX', KEYS[3], KEEP, 1)
redis.call('HSETNX', KEYS[4], KEEP, 1)
redis.call('ZADD', KEYS[5], 'NX', '+inf', KEEP)
if redis.call('LINDEX', KEYS[6], 0) ~= KEEP then
  redis.call('LPUSH', KEYS[6], KEEP)
end
redis.call('SETNX', KEYS[7], 0)

local list_of = string.sub(KEYS[8], 1, #KEYS[8] - #ARGV[5])
local reaped = 0
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, limit)
-- Newest first: each goes to the head, so the oldest ends up first, as it was taken.
for x = #expired, 1, -1 do
  local lease = expired[x]
  -- In a slot being migrated the lease's list may be on the other node already: then the
  -- lease waits for the next pop there.
  local items = redis.pcall('LRANGE', list_of .. lease, 0, -1)
  if items.err then break end
  local frames = frames_in(items)
  if #items == 0 then
    local packed = redis.call('HGET', KEYS[3], lease)
    if packed then frames = frames_of(packed) end
  end
  local acks = redis.call('HGET', KEYS[4], lease) or ''
  local back = {}
  local i = 0
  for _, f in ipairs(frames) do
    for _, e in ipairs(envelopes(f)) do
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
    local f = frame(back)
    redis.call('LPUSH', KEYS[1], f, head(#back, f, back[1]))
    redis.call('INCRBY', KEYS[7], #back)
  end
  redis.call('DEL', list_of .. lease)
  redis.call('HDEL', KEYS[3], lease)
  redis.call('HDEL', KEYS[4], lease)
  redis.call('ZREM', KEYS[2], lease)
end

local due = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now, 'LIMIT', 0, limit)
if #due > 0 then
  local f = frame(due)
  redis.call('RPUSH', KEYS[1], head(#due, f, due[1]), f)
  redis.call('INCRBY', KEYS[7], #due)
  redis.call('ZREM', KEYS[5], unpack(due))
end

-- Lease the messages wanted, up to twice as many, in whole frames read from their heads.
-- The ready list is never touched once it may be gone (after its last frame is taken): in
-- a migrating slot, touching a missing key fails the script halfway (Redis answers ASK
-- inside scripts), so its length is tracked here instead of asked.
local want = math.min(tonumber(ARGV[1]), MAX_LEASE)
local max_bytes = tonumber(ARGV[6])
local avail = redis.call('LLEN', KEYS[1])
local taken, total, bytes = 0, 0, 0
while total < want and taken + 1 < avail and taken < 2 * MAX_FRAMES and bytes < max_bytes do
  local h = redis.call('LINDEX', KEYS[1], taken)
  if not is_head(h) then break end
  local c = count(h)
  if total + c > 2 * want then break end
  taken = taken + 2
  total = total + c
  bytes = bytes + head_bytes(h)
end
local elements = taken
if taken > 0 then
  redis.call('SORT', KEYS[1], 'BY', 'nosort', 'LIMIT', 0, taken, 'STORE', KEYS[8])
  redis.call('LTRIM', KEYS[1], taken, -1)
  avail = avail - taken
else
  -- Nothing to take whole: what leads the list is a frame much larger than the ask, a frame
  -- without a head, or something no slotq producer wrote. One of them is dealt with.
  local parked = 0
  while avail > 0 and elements == 0 and parked < 100 do
    local x = redis.call('LINDEX', KEYS[1], 0)
    local headed = is_head(x)
    local f = x
    if headed and avail >= 2 then
      f = redis.call('LINDEX', KEYS[1], 1)
    end
    if not is_frame(f) then
      -- Not written by a slotq producer: park it with the dead letters, never block the
      -- shard. The last element is read in place and popped only at the end.
      redis.call('LPOP', KEYS[1])
      avail = avail - 1
      if not headed then
        redis.call('RPUSH', KEYS[6], x)
      end
      parked = parked + 1
    else
      local c = count(f)
      local at = headed and 1 or 0
      local frames, heads = nil, nil
      if c > 2 * want then
        frames, heads = cut(f, want, MAX_PIECES)
        if frames == nil then
          -- Not laid out as expected: unpack and pack again (slow, never seen in practice).
          frames, heads = {}, {}
          local envs = envelopes(f)
          local i = 1
          while i <= #envs do
            local last = math.min(i + want - 1, #envs)
            if #frames + 1 >= MAX_PIECES then last = #envs end
            local piece = {}
            for j = i, last do piece[#piece + 1] = envs[j] end
            local pf = frame(piece)
            frames[#frames + 1] = pf
            heads[#heads + 1] = head(#piece, pf, piece[1])
            i = last + 1
          end
        end
      end
      if frames ~= nil and #frames > 1 then
        -- The first piece is leased; the others take the frame's place, in order, and the
        -- list never goes away meanwhile.
        local p = #frames
        redis.call('LSET', KEYS[1], at, frames[p])
        if headed then
          redis.call('LSET', KEYS[1], 0, heads[p])
        else
          redis.call('LPUSH', KEYS[1], heads[p])
          avail = avail + 1
        end
        for k = p - 1, 2, -1 do
          redis.call('LPUSH', KEYS[1], frames[k], heads[k])
          avail = avail + 2
        end
        f = frames[1]
        c = count(f)
        redis.call('RPUSH', KEYS[8], heads[1], f)
      else
        -- Taken whole.
        redis.call('RPUSH', KEYS[8], f)
        redis.call('LPOP', KEYS[1], at + 1)
        avail = avail - at - 1
      end
      total = c
      elements = redis.call('LLEN', KEYS[8])
    end
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
  if elements > 0 then
    redis.call('DEL', KEYS[8])
  end
  return {0, 0, reaped, 0, 0}
end
local lease = ARGV[5]
local deadline = now + tonumber(ARGV[2])
redis.call('HSET', KEYS[4], lease,
  string.char(math.floor(total / 256), total % 256, 0, 0) .. string.rep('\0', math.ceil(total / 8)))
redis.call('ZADD', KEYS[2], deadline, lease)
return {1, deadline, reaped, total, elements}
