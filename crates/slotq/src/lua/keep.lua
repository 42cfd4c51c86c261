-- Makes every key of a reliable shard but its ready list exist, for good: a KEEP member,
-- field or list head that no script removes. In a slot being migrated Redis runs a
-- multi-key script only when all of its keys are on the node (or none are), so keys that
-- come and go would stall the shard (TRYAGAIN) for as long as the migration lasts.
-- KEYS: 1 leases, 2 inflight, 3 acks, 4 delayed, 5 dead, 6 ready count. Returns 1.
local KEEP = '~'
redis.call('ZADD', KEYS[1], 'NX', '+inf', KEEP)
redis.call('HSETNX', KEYS[2], KEEP, 1)
redis.call('HSETNX', KEYS[3], KEEP, 1)
redis.call('ZADD', KEYS[4], 'NX', '+inf', KEEP)
if redis.call('LINDEX', KEYS[5], 0) ~= KEEP then
  redis.call('LPUSH', KEYS[5], KEEP)
end
redis.call('SETNX', KEYS[6], 0)
return 1
