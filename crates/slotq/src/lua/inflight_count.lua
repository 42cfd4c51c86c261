-- Messages leased and not yet settled, over all leases of a shard. KEYS: 1 acks.
-- The KEEP field '~' and ordered groups' fences '~f:<group>' (see lease_pop.lua) hold no
-- lease.
local total = 0
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  if string.byte(all[i], 1) ~= 126 then
    local v = all[i + 1]
    total = total + (string.byte(v, 1) * 256 + string.byte(v, 2)) - (string.byte(v, 3) * 256 + string.byte(v, 4))
  end
end
return total
