-- A push carrying a dedup id: enqueued only if the id was not sent within the window.
-- KEYS: 1 the shard's ready list, 2 the id's marker (in the shard's slot),
--       3 (at-least-once queues) the shard's ready count
-- ARGV: 1 the window in ms, 2 messages pushed, 3.. what RPUSH appends (payloads; or a
--       frame head and its frame)
-- Returns the list's new length, or the status DUPLICATE. The marker and the push are one
-- atomic write, replicated together: a failover keeps both or neither, so a sender that
-- did not hear back can send again with the same id and never enqueue twice.
-- A duplicate still writes (the marker's expiry, set to what is left of it): a WAIT that
-- follows on the same connection then covers the first send, so a durable resend that
-- finds the id answers only once the first send is on a replica.
-- A delete's fence (the ready list made a string, see delete_fence.rs): refused before the
-- marker is written.
if redis.call('TYPE', KEYS[1]).ok == 'string' then
  return redis.error_reply('WRONGTYPE the shard is fenced by a delete of its queue')
end
if not redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[1]) then
  local left = redis.call('PTTL', KEYS[2])
  if left > 0 then
    redis.call('PEXPIRE', KEYS[2], left)
  end
  return {ok = 'DUPLICATE'}
end
local len = redis.call('RPUSH', KEYS[1], unpack(ARGV, 3))
if KEYS[3] then
  redis.call('INCRBY', KEYS[3], ARGV[2])
end
return len
