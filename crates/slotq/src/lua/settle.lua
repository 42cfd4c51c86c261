-- Settles messages of one lease: ack (done), nack (requeue now, later, or dead-letter), or
-- release (back to the head of the ready list, not counted as a delivery).
-- KEYS: 1 leases, 2 inflight (leases stored in place, see lease_pop.lua), 3 acks; nack and
--       release also 4 ready, 5 delayed, 6 dead, 7 ready count; last, the lease's list when
--       it has one (acks declare only the lease's keys: those exist while the lease does, so
--       acks go through in a slot that is being migrated)
-- ARGV: 1 lease id, 2 mode ('ack' | 'nack' | 'release' | 'ackall' | 'releaseall'), 3 delay
--       ms (nack), 4 max attempts (nack), 5 messages the caller holds in the lease (-1: not
--       known), 6 the reason a message this nack dead-letters is recorded with (see
--       dead_record in frames.lua: 2 failed, 3 rejected), 7 the detail recorded with it (why
--       the consumer gave up, may be empty), 8.. ranges of message positions in the lease as
--       pairs first, last (1-based, inclusive)
-- 'ackall' acknowledges every message of the lease not settled yet, in O(1); 'releaseall'
-- releases them (a lease whose pop reply was lost: nothing of it was handed out).
-- Returns {settled now, lease complete (0/1), dead-lettered}; {-1, 0, 0} when the lease no
-- longer exists (it expired and its messages were requeued, or it was settled in full);
-- {-2, n, 0} when the lease holds n messages, not as many as the caller says.
local list = nil
if #KEYS == 4 or #KEYS == 8 then list = KEYS[#KEYS] end
local function forget()
  if list then redis.call('DEL', list) end
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('HDEL', KEYS[3], ARGV[1], '~c:' .. ARGV[1])
  redis.call('ZREM', KEYS[1], ARGV[1])
end
local acks = redis.call('HGET', KEYS[3], ARGV[1])
if not acks then
  if ARGV[2] == 'releaseall' then
    -- The pop whose reply was lost has not run (or its lease is gone already): it may
    -- still be queued somewhere (a stalled node, a connection the client gave up on). A
    -- tombstone in the leases set makes it lease nothing when it runs (see lease_pop.lua);
    -- the reaper drops the tombstone after ten minutes, as it would an expired lease.
    redis.call('ZADD', KEYS[1], 'NX', server_ms() + 600000, '~x:' .. ARGV[1])
  end
  return {-1, 0, 0}
end
local n = string.byte(acks, 1) * 256 + string.byte(acks, 2)
local done = string.byte(acks, 3) * 256 + string.byte(acks, 4)
if ARGV[5] ~= '-1' and n ~= tonumber(ARGV[5]) then
  return {-2, n, 0}
end
if ARGV[2] == 'ackall' then
  forget()
  return {n - done, 1, 0}
end

local bytes = {string.byte(acks, 5, -1)}
local nack = ARGV[2] == 'nack'
local release = ARGV[2] == 'release' or ARGV[2] == 'releaseall'
local ranges = {}
if ARGV[2] == 'releaseall' then
  ranges = {1, n}
else
  for j = 8, #ARGV do
    ranges[#ranges + 1] = tonumber(ARGV[j])
  end
end
local envs = nil
local now = 0
if nack or release then
  envs = {}
  local frames = {}
  if list then
    frames = frames_in(redis.call('LRANGE', list, 0, -1))
  end
  if #frames == 0 then
    -- Stored in place (a lease taken while its slot was migrating, or by an older version).
    local stored = redis.call('HGET', KEYS[2], ARGV[1])
    if stored then frames = frames_of(stored) end
  end
  for _, f in ipairs(frames) do
    for _, e in ipairs(envelopes(f)) do
      envs[#envs + 1] = e
    end
  end
  now = server_ms()
end
local delay = tonumber(ARGV[3])
local max_attempts = tonumber(ARGV[4])
local newly, dead = 0, 0
local back = {}
local function popcount(b)
  local c = 0
  while b > 0 do
    c = c + bit.band(b, 1)
    b = bit.rshift(b, 1)
  end
  return c
end

for j = 1, #ranges - 1, 2 do
  local first = math.max(ranges[j] or 1, 1)
  local last = math.min(ranges[j + 1] or 0, n)
  -- Plain acks of whole bytes of the bitmap are set eight at a time.
  while not nack and not release and first <= last and (first - 1) % 8 == 0 and first + 7 <= last do
    local k = math.floor((first - 1) / 8) + 1
    newly = newly + 8 - popcount(bytes[k])
    bytes[k] = 255
    first = first + 8
  end
  for i = first, last do
    local k = math.floor((i - 1) / 8) + 1
    local m = bit.lshift(1, (i - 1) % 8)
    if bit.band(bytes[k], m) == 0 then
      bytes[k] = bit.bor(bytes[k], m)
      newly = newly + 1
      if release then
        back[#back + 1] = envs[i]
      elseif nack then
        local e, a = bump(envs[i])
        if a >= max_attempts then
          redis.call('RPUSH', KEYS[6], dead_record(tonumber(ARGV[6]) or DEAD_FAILED, now, ARGV[7], e))
          dead = dead + 1
        elseif delay > 0 then
          redis.call('ZADD', KEYS[5], now + delay, e)
        else
          back[#back + 1] = e
        end
      end
    end
  end
end
if #back > 0 then
  redis.call('INCRBY', KEYS[7], #back)
  local f = frame(back)
  local h = head(#back, f, back[1])
  if release then
    redis.call('LPUSH', KEYS[4], f, h)
  else
    redis.call('RPUSH', KEYS[4], h, f)
  end
end
done = done + newly
if done >= n then
  forget()
  return {newly, 1, dead}
end
local chunks = {string.char(math.floor(n / 256), n % 256, math.floor(done / 256), done % 256)}
for k = 1, #bytes, 4000 do
  chunks[#chunks + 1] = string.char(unpack(bytes, k, math.min(k + 3999, #bytes)))
end
redis.call('HSET', KEYS[3], ARGV[1], table.concat(chunks))
return {newly, 0, dead}
