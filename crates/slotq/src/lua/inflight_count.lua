-- Messages leased and not yet settled, over all leases of a shard. KEYS: 1 acks.
local total = 0
for _, v in ipairs(redis.call('HVALS', KEYS[1])) do
  total = total + (string.byte(v, 1) * 256 + string.byte(v, 2)) - (string.byte(v, 3) * 256 + string.byte(v, 4))
end
return total
