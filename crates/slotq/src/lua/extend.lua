-- Extends a lease. KEYS: 1 leases. ARGV: 1 lease, 2 lease ms from now.
-- Returns the new deadline (ms), or -1 when the lease no longer exists.
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return -1
end
local t = redis.call('TIME')
local deadline = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], 'XX', deadline, ARGV[1])
return deadline
