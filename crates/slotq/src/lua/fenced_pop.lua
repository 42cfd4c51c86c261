-- A pop by a member of an ordered group on an at-most-once queue: checks the member's grant
-- against the shard's fence, then takes up to `count` messages.
-- KEYS: 1 ready (LIST), 2 the shard's fences (HASH group -> the highest epoch presented),
--       3 (optional) a list of this pop's own, named by the client
-- ARGV: 1 messages wanted, 2 the group, 3 the epoch of the member's grant of this shard
-- With KEYS[3] the messages are moved there unread (RENAME when they are all taken, else
-- SORT ... STORE and LTRIM) and the count is returned: the client reads them with `LPOP
-- take count` sent right behind, in the same write, so that no payload enters Lua (Redis
-- hashes every string that does, byte by byte). Without KEYS[3] (a slot being migrated:
-- Redis refuses a script naming a key that does not exist there yet, TRYAGAIN) the
-- messages are popped here and returned, as `LPOP` returns them.
-- Refused with the error FENCED <fence> <epoch> when a newer grant of the shard was
-- presented here (its holder lost the shard: the server refuses it, whatever its clock or
-- its view of the group says). A newer epoch than the fence claims the shard.
local fence = tonumber(redis.call('HGET', KEYS[2], ARGV[2]) or '0')
local epoch = tonumber(ARGV[3])
if epoch < fence then
  return redis.error_reply('FENCED ' .. fence .. ' ' .. epoch)
elseif epoch > fence then
  redis.call('HSET', KEYS[2], ARGV[2], epoch)
end
if #KEYS < 3 then
  return redis.call('LPOP', KEYS[1], ARGV[1])
end
local len = redis.call('LLEN', KEYS[1])
local n = math.min(tonumber(ARGV[1]), len)
if n <= 0 then
  return 0
end
if n == len then
  redis.call('RENAME', KEYS[1], KEYS[3])
else
  redis.call('SORT', KEYS[1], 'BY', 'nosort', 'LIMIT', 0, n, 'STORE', KEYS[3])
  redis.call('LTRIM', KEYS[1], n, -1)
end
return n
