-- Scheduled sends: keeps messages until their due time (promote.lua pushes them to the
-- ready list then), or pushes them at once when that time has come already.
-- KEYS: 1 scheduled (ZSET id -> due ms since the Unix epoch, compared with this server's
--       clock), 2 scheduled messages (HASH id -> the element to push), 3 ready, and on
--       at-least-once queues 4 ready count
-- ARGV: triples: id (16 bytes), due ms, element (a payload; an envelope on at-least-once
--       queues, pushed as a frame)
-- Returns how many messages were taken (an id already scheduled, a resend, is not stored
-- twice but counts).
-- The ids order messages due in the same millisecond: a producer's ids grow with each
-- send, so its messages due together become ready in the order they were sent.
local now = server_ms()
local frames = #KEYS >= 4
local now_els = {}
for i = 1, #ARGV - 2, 3 do
  local id, due, el = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2]
  if due <= now then
    now_els[#now_els + 1] = el
  elseif redis.call('HEXISTS', KEYS[2], id) == 0 then
    -- The set first: a delete's fence there (a string, see delete_fence.rs) fails the
    -- script before anything is written.
    redis.call('ZADD', KEYS[1], due, id)
    redis.call('HSET', KEYS[2], id, el)
  end
end
push_ready(KEYS[3], frames and KEYS[4] or nil, now_els)
return math.floor(#ARGV / 3)
