-- Moves dead letters back to the tail of the ready list (as one frame) with their delivery
-- count reset; what is not an envelope (bytes no slotq producer wrote) stays dead.
-- KEYS: 1 dead, 2 ready, 3 ready count.
-- ARGV: 1 how many from the head, or 'exact' followed by 2.. dead list elements to move
--       (each as the list holds it, found by the caller: replay by message id). An element
--       no longer there (replayed or purged meanwhile) is skipped, so racing replays move a
--       letter once.
-- Returns how many moved; with 'exact', a 1 or 0 per element named (moved or not there).
-- The dead list starts with a KEEP element (see lease_pop.lua) and never goes away: the
-- last element taken becomes the new KEEP head, so no key is ever touched while missing.
local msgs
local exact = ARGV[1] == 'exact'
local flags = {}
if exact then
  msgs = {}
  for i = 2, #ARGV do
    flags[i - 1] = 0
    if ARGV[i] ~= KEEP and redis.call('LREM', KEYS[1], 1, ARGV[i]) == 1 then
      msgs[#msgs + 1] = ARGV[i]
      flags[i - 1] = 1
    end
  end
else
  local len = redis.call('LLEN', KEYS[1])
  local first = 0
  if len > 0 and redis.call('LINDEX', KEYS[1], 0) == KEEP then
    first = 1
  end
  local last = math.min(len - 1, first + math.min(tonumber(ARGV[1]), 8192) - 1)
  if last < first then
    return 0
  end
  msgs = redis.call('LRANGE', KEYS[1], first, last)
  redis.call('LSET', KEYS[1], last, KEEP)
  redis.call('LTRIM', KEYS[1], last, -1)
end
local back, keep = {}, {}
for i = 1, #msgs do
  local e = dead_body(msgs[i])
  local v = string.byte(e, 2)
  if string.byte(e, 1) == 0xA5 and (v == 0x01 or v == 0x06) and #e >= 28 then
    back[#back + 1] = string.sub(e, 1, 18) .. '\0\0' .. string.sub(e, 21)
  elseif msgs[i] ~= KEEP then
    keep[#keep + 1] = msgs[i]
  end
end
if #back > 0 then
  local f = frame(back)
  redis.call('RPUSH', KEYS[2], head(#back, f, back[1]), f)
  redis.call('INCRBY', KEYS[3], #back)
end
-- What is not an envelope stays dead, right behind the KEEP head, in its order.
if #keep > 0 and redis.call('LINDEX', KEYS[1], 0) ~= KEEP then
  redis.call('LPUSH', KEYS[1], KEEP)
end
for k = #keep, 1, -1 do
  redis.call('LINSERT', KEYS[1], 'AFTER', KEEP, keep[k])
end
if exact then return flags end
return #back
