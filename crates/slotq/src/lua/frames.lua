-- Frames, their heads and envelopes, and the shard keys' KEEP entries: the helpers every
-- at-least-once script shares (this file is put in front of each of them).
--
-- Envelope: 0xA5 0x01, 16 bytes id, u16 BE deliveries so far, u64 BE enqueue ms, payload.
-- Frame: 0xA5 0x02, u16 BE message count, msgpack array of envelopes (one producer batch).
-- Head: 0xA5 0x03, u16 BE message count, u32 BE frame bytes, u64 BE enqueue ms of the
--       frame's first envelope (16 bytes).
--
-- A ready list holds each frame behind its head, pushed by one command. A script learns how
-- many messages a frame holds from its head and moves frames with SORT ... STORE without
-- ever reading them: every string that enters Lua is hashed byte by byte, and reading the
-- frames it leased was most of what a lease cost (0.7 ms for five frames of a thousand).
-- A frame without a head (written by an older version) is still taken, read whole.
local KEEP = '~'

-- Makes every key of a reliable shard but its ready list exist, for good: a KEEP member,
-- field or list head that no script removes. In a slot being migrated Redis runs a
-- multi-key script only when all of its keys are on the node (or none are), so keys that
-- come and go would stall the shard (TRYAGAIN) for as long as the migration lasts.
local function keep_keys(leases, inflight, acks, delayed, dead, ready_count)
  redis.call('ZADD', leases, 'NX', '+inf', KEEP)
  redis.call('HSETNX', inflight, KEEP, 1)
  redis.call('HSETNX', acks, KEEP, 1)
  redis.call('ZADD', delayed, 'NX', '+inf', KEEP)
  if redis.call('LINDEX', dead, 0) ~= KEEP then
    redis.call('LPUSH', dead, KEEP)
  end
  redis.call('SETNX', ready_count, 0)
end

local function is_frame(f)
  return #f >= 5 and string.byte(f, 1) == 0xA5 and string.byte(f, 2) == 0x02
end

local function is_head(h)
  return #h == 16 and string.byte(h, 1) == 0xA5 and string.byte(h, 2) == 0x03
end

-- Messages in a frame or named by a head (the same two bytes in both).
local function count(f)
  return string.byte(f, 3) * 256 + string.byte(f, 4)
end

local function head_bytes(h)
  local a, b, c, d = string.byte(h, 5, 8)
  return ((a * 256 + b) * 256 + c) * 256 + d
end

local function frame(list)
  local n = #list
  return string.char(0xA5, 0x02, math.floor(n / 256), n % 256) .. cmsgpack.pack(list)
end

-- The head of frame f of n messages whose first envelope is e.
local function head(n, f, e)
  local b = #f
  local t = (e ~= nil and #e >= 28) and string.sub(e, 21, 28) or string.rep('\0', 8)
  return string.char(0xA5, 0x03, math.floor(n / 256), n % 256,
    math.floor(b / 16777216) % 256, math.floor(b / 65536) % 256, math.floor(b / 256) % 256,
    b % 256) .. t
end

-- The envelope with its delivery count one higher, and that count.
local function bump(e)
  local a = string.byte(e, 19) * 256 + string.byte(e, 20) + 1
  if a > 65535 then a = 65535 end
  return string.sub(e, 1, 18) .. string.char(math.floor(a / 256), a % 256) .. string.sub(e, 21), a
end

local function envelopes(f)
  return cmsgpack.unpack(string.sub(f, 5))
end

-- Where the envelope at byte p of frame f ends (the byte after it), read from its msgpack
-- header alone, and where its bytes start; nil if p does not start a string.
local function skip(f, p)
  local b = string.byte(f, p)
  if b == nil then return nil end
  if b >= 0xa0 and b <= 0xbf then return p + 1 + (b - 0xa0), p + 1 end
  if b == 0xd9 or b == 0xc4 then return p + 2 + string.byte(f, p + 1), p + 2 end
  if b == 0xda or b == 0xc5 then
    local h, l = string.byte(f, p + 1, p + 2)
    return p + 3 + h * 256 + l, p + 3
  end
  if b == 0xdb or b == 0xc6 then
    local a, b2, c, d = string.byte(f, p + 1, p + 4)
    return p + 5 + ((a * 256 + b2) * 256 + c) * 256 + d, p + 5
  end
  return nil
end

-- Where frame f's first envelope header starts; nil if f is not laid out as expected.
local function body(f)
  local b = string.byte(f, 5)
  if b == nil then return nil end
  if b >= 0x90 and b <= 0x9f then return 6 end
  if b == 0xdc then return 8 end
  if b == 0xdd then return 10 end
  return nil
end

-- A frame of n envelopes from their msgpack bytes, as they are, and its head (e0: where the
-- first envelope starts in `bytes`).
local function reframe(n, bytes, e0)
  local h
  if n < 16 then
    h = string.char(0x90 + n)
  else
    h = string.char(0xdc, math.floor(n / 256), n % 256)
  end
  local f = string.char(0xA5, 0x02, math.floor(n / 256), n % 256) .. h .. bytes
  local first = nil
  if e0 ~= nil then first = string.sub(bytes, e0, e0 + 27) end
  return f, head(n, f, first)
end

-- Cuts frame f into pieces of `size` messages (the last holds the rest; at most `most`
-- pieces) by walking the envelopes' headers and copying bytes: no envelope is unpacked or
-- packed again. Returns lists of frames and of their heads; nil if f is not as expected.
local function cut(f, size, most)
  local n = count(f)
  local start = body(f)
  if start == nil then return nil end
  local frames, heads = {}, {}
  local p, left = start, n
  while left > 0 do
    local k = left
    if #frames + 1 < most and left > size then k = size end
    local from, e0 = p, nil
    for i = 1, k do
      local e
      p, e = skip(f, p)
      if p == nil then return nil end
      if i == 1 then e0 = e - from + 1 end
    end
    local piece, h = reframe(k, string.sub(f, from, p - 1), e0)
    frames[#frames + 1] = piece
    heads[#heads + 1] = h
    left = left - k
  end
  if p ~= #f + 1 then return nil end
  return frames, heads
end

-- The same as `cut`, from envelopes already unpacked.
local function pieces_of(envs, size, most)
  local frames, heads = {}, {}
  local i = 1
  while i <= #envs do
    local last = math.min(i + size - 1, #envs)
    if #frames + 1 >= most then last = #envs end
    local piece = {}
    for j = i, last do piece[#piece + 1] = envs[j] end
    local f = frame(piece)
    frames[#frames + 1] = f
    heads[#heads + 1] = head(#piece, f, piece[1])
    i = last + 1
  end
  return frames, heads
end

-- The frames a lease's list holds (heads skipped).
local function frames_in(items)
  local out = {}
  for _, x in ipairs(items) do
    if is_frame(x) then out[#out + 1] = x end
  end
  return out
end

-- The frames of a lease stored by an older version in the inflight hash: one frame as it
-- is, more as a msgpack array of frames.
local function frames_of(v)
  if is_frame(v) then return {v} end
  return cmsgpack.unpack(v)
end

local function settled(acks, i)
  local b = string.byte(acks, 4 + math.floor((i - 1) / 8) + 1)
  return b ~= nil and bit.band(b, bit.lshift(1, (i - 1) % 8)) ~= 0
end

local function server_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end


-- Pushes elements to the tail of a ready list: on at-least-once queues as one frame behind
-- its head, with the ready count raised (count_key); on at-most-once queues as they are.
local function push_ready(ready, count_key, els)
  if #els == 0 then return end
  if count_key then
    local f = frame(els)
    redis.call('RPUSH', ready, head(#els, f, els[1]), f)
    redis.call('INCRBY', count_key, #els)
  else
    for k = 1, #els, 1000 do
      redis.call('RPUSH', ready, unpack(els, k, math.min(k + 999, #els)))
    end
  end
end

-- A dead letter says why it died: 0xA5 0x04, the reason (u8), when (u64 BE ms, server
-- clock), the detail's length (u16 BE), the detail (text, at most 1024 bytes), then what
-- died: an envelope, or bytes no slotq producer wrote. Reasons: 1 its last delivery's
-- lease ran out, 2 it was nacked on its last attempt (the detail says why, if the consumer
-- did), 3 a consumer dead-lettered it, 4 its deadline passed, 5 not a frame or envelope.
local DEAD_ATTEMPTS, DEAD_FAILED, DEAD_REJECTED, DEAD_EXPIRED, DEAD_UNREADABLE = 1, 2, 3, 4, 5

local function dead_record(reason, now, detail, body)
  detail = string.sub(detail or '', 1, 1024)
  local t = {}
  local n = now
  for i = 8, 1, -1 do
    t[i] = n % 256
    n = math.floor(n / 256)
  end
  return string.char(0xA5, 0x04, reason, unpack(t)) ..
    string.char(math.floor(#detail / 256), #detail % 256) .. detail .. body
end

local function is_dead_record(d)
  return #d >= 13 and string.byte(d, 1) == 0xA5 and string.byte(d, 2) == 0x04
end

-- What a dead record holds (the record itself when it is not one).
local function dead_body(d)
  if not is_dead_record(d) then return d end
  local len = string.byte(d, 12) * 256 + string.byte(d, 13)
  return string.sub(d, 14 + len)
end
