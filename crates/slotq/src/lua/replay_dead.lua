-- Moves up to N dead letters back to the tail of the ready list (as one frame) with their
-- delivery count reset; entries that are not envelopes stay dead.
-- KEYS: 1 dead, 2 ready, 3 ready count. ARGV: 1 count. Returns how many moved.
local msgs = redis.call('LPOP', KEYS[1], math.min(tonumber(ARGV[1]), 8192))
if not msgs then
  return 0
end
local back, keep = {}, {}
for i = 1, #msgs do
  local e = msgs[i]
  if string.byte(e, 1) == 0xA5 and string.byte(e, 2) == 0x01 and #e >= 28 then
    back[#back + 1] = string.sub(e, 1, 18) .. '\0\0' .. string.sub(e, 21)
  else
    keep[#keep + 1] = e
  end
end
if #back > 0 then
  local n = #back
  redis.call('RPUSH', KEYS[2], string.char(0xA5, 0x02, math.floor(n / 256), n % 256) .. cmsgpack.pack(back))
  redis.call('INCRBY', KEYS[3], n)
end
for k = 1, #keep, 4000 do
  redis.call('RPUSH', KEYS[1], unpack(keep, k, math.min(k + 3999, #keep)))
end
return #back
