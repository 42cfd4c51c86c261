-- Creates a queue's registry unless it exists; returns the registry either way.
-- KEYS[1] = registry hash; ARGV = field, value, field, value, ...
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], unpack(ARGV))
end
return redis.call('HGETALL', KEYS[1])
