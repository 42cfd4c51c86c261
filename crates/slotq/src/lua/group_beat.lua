-- A consumer-group member's heartbeat: renews its membership, drops members that stopped
-- renewing, and recomputes who owns which shard. Runs atomically in the queue's registry
-- slot, so every member sees one assignment: the script is the coordinator.
-- KEYS: 1 registry (HASH: active, draining, retiring = shard numbers), 2 the group (HASH:
--       m:<id> -> membership deadline ms; o:<shard> -> owner, or "<owner> <next>" while an
--       ordered handover waits; e:<shard> -> the epoch of the shard's current grant;
--       f:<shard> -> ms before which the owner may not pop; d:<shard> -> 1 when its owner
--       reports it deep; gen; mode). One key, read once per beat.
-- ARGV: 1 member id, 2 timeout ms, 3 'beat' | 'leave', 4 mode ('ordered' | 'unordered'),
--       5 lease ms (ordered at-least-once: how long a leaving member's unsettled leases may
--       still run), 6 shards the member still holds (space-separated numbers), 7 shards it
--       reports deep, 8 shards whose fence refused it, as "<n>:<fence>" (a grant that
--       lost to a higher fence: the registry master failed over and forgot the last epochs)
-- Returns {gen, owned, released, waiting, deep, members}: space-separated shard numbers,
-- owned ones as "<n>:<epoch>" (owned: pop them, presenting the epoch to the shard's
-- fence; released: stop and confirm by leaving them out of 'held'; waiting: yours once
-- the old owner let go; deep: others' deep shards, to steal from).
-- Or {-1, mode} when the group runs in the other mode; {-2} when the queue's registry is
-- gone or being deleted (nothing is written, so a member cannot bring its group back).
--
-- Epochs: `gen` only grows (it outlives the last member), and every grant of a shard to a
-- member takes the epoch gen + 1 of the beat that made it, so a shard's grants carry
-- strictly growing epochs. The shard's own slot keeps the highest epoch presented to it
-- (the fence, see lease_pop.lua and fenced_pop.lua): a holder of an older grant is refused
-- there by the server, whatever its clock or its view says.
-- A registry without a version is gone or being deleted (a tombstone, see delete.rs).
if redis.call('HEXISTS', KEYS[1], 'version') == 0 then
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
-- Fences above this member's grants: the gen must pass them, and those grants are made anew.
local refused, floor = {}, 0
for n, fence in string.gmatch(ARGV[8] or '', '(%d+):(%d+)') do
  refused[n] = true
  floor = math.max(floor, tonumber(fence))
end
if floor > tonumber(cur.gen or '0') then
  put('gen', floor)
end
local epoch = tonumber(cur.gen or '0') + 1

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

-- Shards: active, draining and retiring ones all need an owner (a retiring shard is read
-- until it is empty).
local shards = {}
for _, list in ipairs(redis.call('HMGET', KEYS[1], 'active', 'draining', 'retiring')) do
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
-- A dead owner's shards are free at once: the successor's first pop presents a higher
-- epoch to the shard's fence, which returns every lease of the shard to its head (oldest
-- first) and refuses the old owner from then on. A member that leaves cleanly says which
-- shards it still holds unsettled work of: those wait for its own leases to run out (its
-- application may still settle them); the others are free at once.
local function free_after(old, k)
  if ordered and old == me and leaving and held[k] then
    return now + lease
  end
  return now
end
for f in pairs(cur) do
  local n = string.match(f, '^[ofde]:(%d+)$')
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
      put('e:' .. k, epoch)
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
  if a == me and not b and refused[k] then
    put('e:' .. k, epoch)
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
        if owner[k] ~= id then
          put('e:' .. k, epoch)
        end
        owner[k], next_owner[k] = id, nil
      end
      changed = true
    end
  end
end

-- The last member gone: its members, owners and reports go; the gen, the epochs and the
-- waits of a member that left with unsettled work stay, so that epochs keep growing and a
-- member that joins next still waits.
if m == 0 then
  for f in pairs(cur) do
    if f == 'mode' or string.match(f, '^[mod]:') then
      redis.call('HDEL', KEYS[2], f)
    end
  end
  if changed then
    redis.call('HSET', KEYS[2], 'gen', tonumber(cur.gen or '0') + 1)
  end
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
    owned[#owned + 1] = k .. ':' .. (cur['e:' .. k] or '0')
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
