-- Compare-and-set of a queue's registry on its version.
-- KEYS[1] = registry hash; ARGV[1] = expected version; ARGV[2..] = field, value, ...
-- Returns 1 when written, 0 when the version moved on (the caller re-reads and retries).
if redis.call('HGET', KEYS[1], 'version') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return 1
