-- RPUSH that refuses to grow a shard past a maximum depth.
-- KEYS[1] = shard's ready list; ARGV[1] = max depth; ARGV[2..] = payloads.
-- Returns the new length, or -(current length) - 1 when the batch does not fit.
local len = redis.call('LLEN', KEYS[1])
if len + #ARGV - 1 > tonumber(ARGV[1]) then
  return -len - 1
end
return redis.call('RPUSH', KEYS[1], unpack(ARGV, 2))
