-- Cancels scheduled messages that are not due yet (not yet moved to the ready list).
-- KEYS: 1 scheduled (ZSET id -> due ms), 2 scheduled messages (HASH id -> element)
-- ARGV: ids
-- Returns a 1 (cancelled) or 0 (not waiting here) per id.
local out = {}
for i = 1, #ARGV do
  out[i] = 0
  if redis.call('ZREM', KEYS[1], ARGV[i]) == 1 then
    redis.call('HDEL', KEYS[2], ARGV[i])
    out[i] = 1
  end
end
return out
