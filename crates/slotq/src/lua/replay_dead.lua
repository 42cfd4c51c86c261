-- Moves up to N dead letters back to the tail of the ready list with their delivery count
-- reset. KEYS: 1 dead, 2 ready. ARGV: 1 count. Returns how many moved.
local msgs = redis.call('LPOP', KEYS[1], tonumber(ARGV[1]))
if not msgs then
  return 0
end
for i = 1, #msgs do
  local e = msgs[i]
  msgs[i] = string.sub(e, 1, 18) .. '\0\0' .. string.sub(e, 21)
end
for k = 1, #msgs, 4000 do
  redis.call('RPUSH', KEYS[2], unpack(msgs, k, math.min(k + 3999, #msgs)))
end
return #msgs
