-- Reliable pop: reap expired leases and due delayed messages, then lease up to N messages.
-- KEYS: 1 ready (LIST), 2 leases (ZSET lease -> deadline ms), 3 inflight (HASH lease ->
--       msgpack of the leased envelopes), 4 acks (HASH lease -> u16 n, u16 settled, bitmap),
--       5 delayed (ZSET envelope -> due ms), 6 dead (LIST), 7 lease sequence (STRING)
-- ARGV: 1 count, 2 lease ms, 3 max attempts, 4 reap limit
-- Returns {lease, deadline ms, reaped, msgpack array of the envelopes}; lease 0 when
-- nothing was leased. (One msgpack string instead of N replies: the same bytes are stored
-- for the lease, and Redis builds one reply item instead of N.)
-- Envelope: 2 bytes magic 0xA5 0x01, 16 bytes id, u16 BE deliveries so far, u64 BE
-- enqueue time (ms), payload.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[4])
local max_attempts = tonumber(ARGV[3])

local function bump(e)
  local a = string.byte(e, 19) * 256 + string.byte(e, 20) + 1
  if a > 65535 then a = 65535 end
  return string.sub(e, 1, 18) .. string.char(math.floor(a / 256), a % 256) .. string.sub(e, 21), a
end

local function settled(acks, i)
  local b = string.byte(acks, 4 + math.floor((i - 1) / 8) + 1)
  return b ~= nil and bit.band(b, bit.lshift(1, (i - 1) % 8)) ~= 0
end

local reaped = 0
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, limit)
for _, lease in ipairs(expired) do
  local packed = redis.call('HGET', KEYS[3], lease)
  if packed then
    local acks = redis.call('HGET', KEYS[4], lease) or ''
    local msgs = cmsgpack.unpack(packed)
    for i = #msgs, 1, -1 do
      if not settled(acks, i) then
        local e, a = bump(msgs[i])
        if a >= max_attempts then
          redis.call('RPUSH', KEYS[6], e)
        else
          redis.call('LPUSH', KEYS[1], e)
        end
        reaped = reaped + 1
      end
    end
  end
  redis.call('HDEL', KEYS[3], lease)
  redis.call('HDEL', KEYS[4], lease)
  redis.call('ZREM', KEYS[2], lease)
end

local due = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now, 'LIMIT', 0, limit)
if #due > 0 then
  redis.call('RPUSH', KEYS[1], unpack(due))
  redis.call('ZREM', KEYS[5], unpack(due))
end

local n = tonumber(ARGV[1])
if n == 0 then
  return {0, 0, reaped}
end
local msgs = redis.call('LPOP', KEYS[1], n)
if not msgs then
  return {0, 0, reaped}
end
local lease = redis.call('INCR', KEYS[7])
local deadline = now + tonumber(ARGV[2])
local count = #msgs
local packed = cmsgpack.pack(msgs)
redis.call('HSET', KEYS[3], lease, packed)
redis.call('HSET', KEYS[4], lease,
  string.char(math.floor(count / 256), count % 256, 0, 0) .. string.rep('\0', math.ceil(count / 8)))
redis.call('ZADD', KEYS[2], deadline, lease)
return {lease, deadline, reaped, packed}
