-- Reliable pop: reap expired leases and due delayed messages, then lease messages.
-- KEYS: 1 ready (LIST: each frame behind its head), 2 leases (ZSET lease -> deadline ms),
--       3 inflight (HASH lease -> its frames, for leases stored in place), 4 acks (HASH
--       lease -> u16 count, u16 settled, bitmap), 5 delayed (ZSET envelope -> due ms),
--       6 dead (LIST of dead records, see frames.lua), 7 ready count (STRING: messages in 1), and
--       8 (optional) this lease's list: every lease's list is named like it, the lease id
--       last
-- ARGV: 1 messages wanted, 2 lease ms, 3 max attempts, 4 reap limit, 5 lease id (chosen
--       by the client: 128 random bits, so no two leases ever share a name, not even
--       across a failover that lost the last writes), 6 most bytes to lease (at least one
--       frame is taken), and for members of ordered groups 7 the group, 8 the epoch of the
--       member's grant of this shard (see the fence below)
-- With KEYS[8] the frames are moved into the lease's list without being read (SORT ...
-- STORE), and the client reads that list right behind this call (LRANGE, same write).
-- Returns {leased (0/1), deadline ms, reaped, messages leased, elements in the list,
-- elements left in the ready list}: a consumer that saw every shard left empty waits on
-- them instead of asking again. Without KEYS[8] (a slot being migrated: Redis refuses a
-- script naming a key that does not exist yet there, TRYAGAIN) the frames are read, stored
-- in place in KEYS[3], and returned: {leased, deadline ms, reaped, messages leased, 0,
-- elements left, frame...}.
--
-- Every shard key but the ready list always exists (a KEEP member, never removed): in a
-- slot that is being migrated, Redis serves a multi-key script only when all of its keys
-- are on the node, and answers TRYAGAIN for as long as some exist and others do not.
local now = server_ms()
local limit = tonumber(ARGV[4])
local max_attempts = tonumber(ARGV[3])
local MAX_LEASE = 16384
local MAX_FRAMES = 256
-- Most pieces one frame is cut into for leases that ask much less than it holds.
local MAX_PIECES = 64

-- The KEEP entries are made together (here and by keep.lua) and never removed, so the
-- leases' one stands for all of them: a lease costs one call for them, not six.
if not redis.call('ZSCORE', KEYS[2], KEEP) then
  keep_keys(KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7])
end

-- A pop whose client gave up on its reply and released it by name before it ran (see
-- settle.lua, 'releaseall'): it leases nothing, so nothing is taken that nobody receives.
local tombstone = '~x:' .. ARGV[5]
if redis.call('ZSCORE', KEYS[2], tombstone) then
  redis.call('ZREM', KEYS[2], tombstone)
  return {0, 0, 0, 0, 0, 0}
end

-- The fence of an ordered group: the highest epoch presented to this shard, kept in the
-- acks hash (a key that always exists) under '~f:<group>' (lease ids are hex, so no lease
-- is named so). An older epoch is refused: its holder lost the shard. A newer one claims
-- the shard: every lease of the shard goes back to the head of the ready list now (oldest
-- first; their holder's settles will find them gone), so the new owner starts where the
-- old one stopped, without waiting for those leases to run out.
local claiming = false
if ARGV[7] then
  local field = '~f:' .. ARGV[7]
  local fence = tonumber(redis.call('HGET', KEYS[4], field) or '0')
  local epoch = tonumber(ARGV[8])
  if epoch < fence then
    return redis.error_reply('FENCED ' .. fence .. ' ' .. epoch)
  elseif epoch > fence then
    redis.call('HSET', KEYS[4], field, epoch)
    claiming = true
  end
end

local in_list = #KEYS >= 8
-- Every lease's list is named like KEYS[2] with "lease:<id>" for "leases".
local list_of = string.sub(KEYS[2], 1, #KEYS[2] - #'leases') .. 'lease:'
local reaped = 0
local expired
if claiming then
  -- Every lease (the KEEP member sits at +inf), in the order the leases were made (an
  -- extended lease has a later deadline than newer ones): ordered pops number their
  -- leases ('~c:<lease>' in the acks hash); others, unnumbered, count as older.
  expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(+inf')
  if #expired > 1 then
    local fields = {}
    for x, lease in ipairs(expired) do fields[x] = '~c:' .. lease end
    local made = redis.call('HMGET', KEYS[4], unpack(fields))
    local rank = {}
    for x, lease in ipairs(expired) do rank[lease] = {tonumber(made[x] or '0'), x} end
    table.sort(expired, function(a, b)
      local ra, rb = rank[a], rank[b]
      if ra[1] ~= rb[1] then return ra[1] < rb[1] end
      return ra[2] < rb[2]
    end)
  end
else
  expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, limit)
end
-- Newest first: each goes to the head, so the oldest ends up first, as it was taken.
for x = #expired, 1, -1 do
  local lease = expired[x]
  -- A lease is stored in place (inflight) or in a list of its own; pops of both kinds
  -- reap both. In a slot being migrated the lease's list may be on the other node
  -- already: then the lease waits for a later pop.
  local frames
  local listed = false
  local packed = redis.call('HGET', KEYS[3], lease)
  if packed then
    frames = frames_of(packed)
  else
    local items = redis.pcall('LRANGE', list_of .. lease, 0, -1)
    if items.err then break end
    frames = frames_in(items)
    listed = true
  end
  local acks = redis.call('HGET', KEYS[4], lease) or ''
  local back = {}
  local i = 0
  for _, f in ipairs(frames) do
    local ok, envs = pcall(envelopes, f)
    if not ok then
      -- A frame that cannot be read (leased unread, so no one could take its messages):
      -- kept whole with the dead letters; it must never stop the shard's pops.
      redis.call('RPUSH', KEYS[6], dead_record(DEAD_UNREADABLE, now, 'a leased frame that cannot be read', f))
      i = i + count(f)
      envs = {}
    end
    for _, e in ipairs(envs) do
      i = i + 1
      if not settled(acks, i) then
        local e2, a = bump(e)
        if a >= max_attempts then
          redis.call('RPUSH', KEYS[6], dead_record(DEAD_ATTEMPTS, now, 'the lease of its last delivery expired', e2))
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
  if listed then redis.call('DEL', list_of .. lease) end
  redis.call('HDEL', KEYS[3], lease)
  redis.call('HDEL', KEYS[4], lease, '~c:' .. lease)
  redis.call('ZREM', KEYS[2], lease)
end

local due = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now, 'LIMIT', 0, limit)
if #due > 0 then
  local f = frame(due)
  redis.call('RPUSH', KEYS[1], head(#due, f, due[1]), f)
  redis.call('INCRBY', KEYS[7], #due)
  redis.call('ZREM', KEYS[5], unpack(due))
end

-- Lease the messages wanted, up to twice as many.
-- The ready list is never touched once it may be gone (after its last frame is taken): in
-- a migrating slot, touching a missing key fails the script halfway (Redis answers ASK
-- inside scripts), so its length is tracked here instead of asked.
local want = math.max(math.min(tonumber(ARGV[1]), MAX_LEASE), 1)
local max_bytes = tonumber(ARGV[6])
local avail = redis.call('LLEN', KEYS[1])

-- Takes up to `most` frames from the head of the ready list by reading them: how every
-- lease stored in place is taken, and how a lease into a list takes what leads the list
-- when that cannot be moved unread (a frame much larger than the ask, a frame without a
-- head, or something no slotq producer wrote, which goes to the dead letters). A frame
-- much larger than the rest of the ask is cut in pieces of that size: the first is taken,
-- the others take the frame's place, so the next leases find frames they take whole.
local function take_by_reading(most)
  local frames, total, bytes, parked = {}, 0, 0, 0
  while total < want and avail > 0 and #frames < most and bytes < max_bytes and parked < 100 do
    local x = redis.call('LINDEX', KEYS[1], 0)
    local headed = is_head(x)
    local f = x
    if headed and avail >= 2 then
      f = redis.call('LINDEX', KEYS[1], 1)
    end
    local at = headed and 1 or 0
    local readable = is_frame(f)
    local pieces, heads = nil, nil
    if readable and total + count(f) > 2 * want then
      pieces, heads = cut(f, want - total, MAX_PIECES)
      if pieces == nil then
        -- Not laid out as expected: unpack and pack again (slow, never seen in practice).
        local ok, envs = pcall(envelopes, f)
        if ok then
          pieces, heads = pieces_of(envs, want - total, MAX_PIECES)
        else
          readable = false
        end
      end
    end
    if not readable then
      -- Not written by a slotq producer, or a frame that cannot be read: parked with the
      -- dead letters (a head is dropped), never blocking the shard.
      if headed and is_frame(f) then
        redis.call('LPOP', KEYS[1], 2)
        avail = avail - 2
        redis.call('RPUSH', KEYS[6], dead_record(DEAD_UNREADABLE, now, 'a frame that cannot be read', f))
      else
        redis.call('LPOP', KEYS[1])
        avail = avail - 1
        if not headed then
          redis.call('RPUSH', KEYS[6], dead_record(DEAD_UNREADABLE, now, 'not a slotq frame', x))
        end
      end
      parked = parked + 1
    else
      if pieces ~= nil and #pieces > 1 then
        -- The list never goes away meanwhile: the last piece is written over the frame.
        local p = #pieces
        redis.call('LSET', KEYS[1], at, pieces[p])
        if headed then
          redis.call('LSET', KEYS[1], 0, heads[p])
        else
          redis.call('LPUSH', KEYS[1], heads[p])
          avail = avail + 1
        end
        for k = p - 1, 2, -1 do
          redis.call('LPUSH', KEYS[1], pieces[k], heads[k])
          avail = avail + 2
        end
        f = pieces[1]
      else
        redis.call('LPOP', KEYS[1], at + 1)
        avail = avail - at - 1
      end
      frames[#frames + 1] = f
      total = total + count(f)
      bytes = bytes + #f
    end
  end
  return frames, total
end

local total, elements, frames = 0, 0, {}
if in_list then
  -- Whole frames, chosen from their heads and moved unread.
  local bytes = 0
  while total < want and elements + 1 < avail and elements < 2 * MAX_FRAMES and bytes < max_bytes do
    local h = redis.call('LINDEX', KEYS[1], elements)
    if not is_head(h) then break end
    local c = count(h)
    if total + c > 2 * want then break end
    elements = elements + 2
    total = total + c
    bytes = bytes + head_bytes(h)
  end
  if elements > 0 and elements == avail then
    -- The lease takes the whole list: renamed, nothing copied (the list is gone after).
    redis.call('RENAME', KEYS[1], KEYS[8])
    avail = 0
  elseif elements > 0 then
    redis.call('SORT', KEYS[1], 'BY', 'nosort', 'LIMIT', 0, elements, 'STORE', KEYS[8])
    redis.call('LTRIM', KEYS[1], elements, -1)
    avail = avail - elements
  elseif avail > 0 then
    frames, total = take_by_reading(1)
    if #frames > 0 then
      redis.call('RPUSH', KEYS[8], unpack(frames))
      elements = #frames
    end
  end
else
  frames, total = take_by_reading(MAX_FRAMES)
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
  return {0, 0, reaped, 0, 0, avail}
end
local lease = ARGV[5]
local deadline = now + tonumber(ARGV[2])
if not in_list then
  -- One frame (most leases) is stored as it is: packing it would copy it once more.
  redis.call('HSET', KEYS[3], lease, #frames == 1 and frames[1] or cmsgpack.pack(frames))
end
redis.call('HSET', KEYS[4], lease,
  string.char(math.floor(total / 256), total % 256, 0, 0) .. string.rep('\0', math.ceil(total / 8)))
redis.call('ZADD', KEYS[2], deadline, lease)
if ARGV[7] then
  -- Ordered: the lease's number, the order a claim gives the leases back in.
  redis.call('HSET', KEYS[4], '~c:' .. lease, redis.call('HINCRBY', KEYS[4], '~n', 1))
end
if in_list then
  return {1, deadline, reaped, total, elements, avail}
end
local out = {1, deadline, reaped, total, 0, avail}
for k = 1, #frames do
  out[k + 6] = frames[k]
end
return out
