-- Moves the scheduled messages whose due time has come (and, on at-least-once queues, the
-- delayed redeliveries whose delay is over) to the tail of the ready list, oldest due
-- first. Run by consumers when the earliest due time they know of comes, and every poll.
-- KEYS: 1 scheduled (ZSET id -> due ms), 2 scheduled messages (HASH id -> element),
--       3 ready, and on at-least-once queues 4 ready count, 5 delayed (ZSET envelope -> due
--       ms, KEEP member at +inf)
-- ARGV: 1 most messages to move
-- Returns {moved, the earliest due time left (ms; -1 when nothing waits), this server's
-- clock (ms)}: the caller sleeps for the difference, on its own clock.
local now = server_ms()
local limit = tonumber(ARGV[1])
local frames = #KEYS >= 5
local els = {}
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, limit)
if #ids > 0 then
  local got = redis.call('HMGET', KEYS[2], unpack(ids))
  for i = 1, #ids do
    if got[i] then els[#els + 1] = got[i] end
  end
  redis.call('ZREM', KEYS[1], unpack(ids))
  redis.call('HDEL', KEYS[2], unpack(ids))
end
if frames and #els < limit then
  local due = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now, 'LIMIT', 0, limit - #els)
  if #due > 0 then
    redis.call('ZREM', KEYS[5], unpack(due))
    for _, e in ipairs(due) do els[#els + 1] = e end
  end
end
push_ready(KEYS[3], frames and KEYS[4] or nil, els)
local next_due = -1
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #first == 2 then next_due = tonumber(first[2]) end
if frames then
  local d = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', '(+inf', 'WITHSCORES', 'LIMIT', 0, 1)
  if #d == 2 and (next_due < 0 or tonumber(d[2]) < next_due) then next_due = tonumber(d[2]) end
end
return {#els, next_due, now}
