-- A consumer-group member's heartbeat: renews its membership, drops members that stopped
-- renewing, and recomputes who owns which shard. Runs atomically in the queue's registry
-- slot, so every member sees one assignment: the script is the coordinator.
-- KEYS: 1 registry (HASH: active, draining = shard numbers), 2 the group (HASH: m:<id> ->
--       membership deadline ms; o:<shard> -> owner, or "<owner> <next>" while an ordered
--       handover waits; f:<shard> -> ms before which the owner may not pop; d:<shard> -> 1
--       when its owner reports it deep; gen; mode). One key, read once per beat.
-- ARGV: 1 member id, 2 timeout ms, 3 'beat' | 'leave', 4 mode ('ordered' | 'unordered'),
--       5 lease ms (ordered at-least-once: how long a dead owner's leases may still run),
--       6 shards the member still holds (space-separated numbers), 7 shards it reports deep
-- Returns {gen, owned, released, waiting, deep, members}: space-separated shard numbers
-- (owned: pop them; released: stop and confirm by leaving them out of 'held'; waiting:
-- yours once the old owner let go; deep: others' deep shards, to steal from).
-- Or {-1, mode} when the group runs in the other mode; {-2} when the queue's registry is
-- gone (the queue was deleted: nothing is written, so a member cannot bring its group back).
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {-2}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local me, timeout, leaving = ARGV[1], tonumber(ARGV[2]), ARGV[3] == 'leave'
local ordered, lease = ARGV[4] == 'ordered', tonumber(ARGV[5])

-- Everything of the group in one read; below, only what changed is written.
local cur = {}
local alive, gone = {}, {}
local flat = redis.call('HGETALL', KEYS[2])
for i = 1, #flat, 2 do
  local f, v = flat[i], flat[i + 1]
  cur[f] = v
  local id = string.match(f, '^m:(.+)$')
  if id and id ~= me then
    local d = tonumber(v)
    if d < now then
      gone[id] = d
    else
      alive[id] = d
    end
  end
end
if cur.mode and cur.mode ~= ARGV[4] and next(alive) ~= nil then
  return {-1, cur.mode}
end
local function put(field, value)
  if value == nil then
    if cur[field] ~= nil then
      redis.call('HDEL', KEYS[2], field)
      cur[field] = nil
    end
  elseif cur[field] ~= tostring(value) then
    redis.call('HSET', KEYS[2], field, value)
    cur[field] = tostring(value)
  end
end
put('mode', ARGV[4])

local function set(s)
  local out = {}
  for w in string.gmatch(s or '', '%S+') do
    out[w] = true
  end
  return out
end

local held = set(ARGV[6])

-- Members: renew me, drop the silent.
for id in pairs(gone) do
  put('m:' .. id, nil)
end
if leaving then
  put('m:' .. me, nil)
  gone[me] = now
else
  redis.call('HSET', KEYS[2], 'm:' .. me, now + timeout)
  cur['m:' .. me] = tostring(now + timeout)
  alive[me] = now + timeout
end
local ids = {}
for id in pairs(alive) do
  ids[#ids + 1] = id
end
table.sort(ids)

-- Shards: active and draining ones all need an owner.
local shards = {}
for _, list in ipairs(redis.call('HMGET', KEYS[1], 'active', 'draining')) do
  for w in string.gmatch(list or '', '%S+') do
    shards[#shards + 1] = tonumber(w)
  end
end
table.sort(shards)
local known = {}
for _, n in ipairs(shards) do
  known[tostring(n)] = true
end

local changed = false
local owner, next_owner, load = {}, {}, {}
for _, id in ipairs(ids) do
  load[id] = 0
end
-- A dead owner's leases may run until its deadline plus a lease: an ordered successor
-- waits that long, so that nothing newer is processed before what it held. A member that
-- leaves says which shards it still holds work of; the others are free at once.
local function free_after(old, k)
  if ordered and gone[old] and (old ~= me or held[k]) then
    return gone[old] + lease
  end
  return now
end
for f in pairs(cur) do
  local n = string.match(f, '^[ofd]:(%d+)$')
  if n and not known[n] then
    put(f, nil)
  end
end
for _, n in ipairs(shards) do
  local k = tostring(n)
  local o = cur['o:' .. k]
  local a, b = nil, nil
  if o then
    a, b = string.match(o, '^(%S+) ?(%S*)$')
    if b == '' then b = nil end
  end
  if a and b then
    -- An ordered handover: complete it once the old owner let go (or died).
    if not alive[a] or (a == me and not held[k]) then
      put('f:' .. k, free_after(a, k))
      a, b = b, nil
      changed = true
    end
  end
  if a and not alive[a] then
    if ordered then
      put('f:' .. k, free_after(a, k))
    end
    a, b = nil, nil
    changed = true
  end
  if b and not alive[b] then
    b = nil
    changed = true
  end
  owner[k], next_owner[k] = a, b
  local holder = b or a
  if holder then
    load[holder] = load[holder] + 1
  end
end

-- Balance by shard count, sticky: who has more keeps the extra ones.
local m = #ids
if m > 0 then
  local base, extra = math.floor(#shards / m), #shards % m
  local by_load = {}
  for _, id in ipairs(ids) do
    by_load[#by_load + 1] = id
  end
  table.sort(by_load, function(x, y)
    if load[x] ~= load[y] then return load[x] > load[y] end
    return x < y
  end)
  local target = {}
  for i, id in ipairs(by_load) do
    target[id] = base + ((i <= extra) and 1 or 0)
  end
  -- Give up surplus (highest shard numbers first), collect orphans.
  local pool = {}
  for i = #shards, 1, -1 do
    local k = tostring(shards[i])
    local holder = next_owner[k] or owner[k]
    if not holder then
      pool[#pool + 1] = k
    elseif load[holder] > target[holder] then
      load[holder] = load[holder] - 1
      pool[#pool + 1] = k
      if next_owner[k] then
        next_owner[k] = nil -- the handover is off; the old owner gets it re-planned
      end
    end
  end
  -- Fill members under target, lowest shard numbers first.
  local j = #pool
  for _, id in ipairs(ids) do
    while load[id] < target[id] and j >= 1 do
      local k = pool[j]
      j = j - 1
      load[id] = load[id] + 1
      if owner[k] and owner[k] ~= id and ordered then
        next_owner[k] = id
      else
        if owner[k] ~= id and not ordered then
          put('f:' .. k, nil)
        end
        owner[k], next_owner[k] = id, nil
      end
      changed = true
    end
  end
end

-- The last member gone: nothing of the group stays behind.
if m == 0 then
  redis.call('DEL', KEYS[2])
  return {0, '', '', '', '', 0}
end

local owned, released, waiting, deep = {}, {}, {}, {}
local reported = set(ARGV[7])
for _, n in ipairs(shards) do
  local k = tostring(n)
  local a, b = owner[k], next_owner[k]
  put('o:' .. k, a and (b and (a .. ' ' .. b) or a) or nil)
  if a == me and not b then
    put('d:' .. k, reported[k] and 1 or nil)
  end
  local free = tonumber(cur['f:' .. k] or '0')
  if free <= now then
    put('f:' .. k, nil)
  end
  if a == me and b then
    released[#released + 1] = k
  elseif a == me and free <= now then
    owned[#owned + 1] = k
  elseif a == me or b == me then
    waiting[#waiting + 1] = k
  elseif cur['d:' .. k] then
    deep[#deep + 1] = k
  end
end
if changed then
  put('gen', tonumber(cur.gen or '0') + 1)
end
return {tonumber(cur.gen or '0'), table.concat(owned, ' '), table.concat(released, ' '),
  table.concat(waiting, ' '), table.concat(deep, ' '), m}
