-- A pop by a member of an ordered group on an at-most-once queue: checks the member's grant
-- against the shard's fence, then `LPOP ready count`.
-- KEYS: 1 ready (LIST), 2 the shard's fences (HASH group -> the highest epoch presented)
-- ARGV: 1 messages wanted, 2 the group, 3 the epoch of the member's grant of this shard
-- Returns what LPOP returns; the error FENCED <fence> <epoch> when a newer grant of the
-- shard was presented here (its holder lost the shard: the server refuses it, whatever
-- its clock or its view of the group says). A newer epoch than the fence claims the shard.
local fence = tonumber(redis.call('HGET', KEYS[2], ARGV[2]) or '0')
local epoch = tonumber(ARGV[3])
if epoch < fence then
  return redis.error_reply('FENCED ' .. fence .. ' ' .. epoch)
elseif epoch > fence then
  redis.call('HSET', KEYS[2], ARGV[2], epoch)
end
return redis.call('LPOP', KEYS[1], ARGV[1])
