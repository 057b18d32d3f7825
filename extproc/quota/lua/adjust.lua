-- Changes what applied takes consumed, by a signed delta each, at the store's time. The same
-- arithmetic as MemoryStore.adjust_now in extproc/quota/memory.py.
--
-- KEYS[i]: adjustment i's counter (all share one hash tag). ARGV: 7 values per adjustment:
-- algorithm (1 gcra, 2 sliding window, 3 fixed window, 4 concurrency), limit, window_ms, burst,
-- amount taken (unused: what a request holds is read), ref (window index or request id),
-- delta.
-- A counter that has expired, or a window that has gone, is left alone; no count goes below
-- empty.

local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + tonumber(clock[2]) / 1000

local function num(x)
  return string.format('%.17g', x)
end

local function gcra(key, limit, window, delta)
  local tat = tonumber(redis.call('GET', key))
  if not tat then
    return
  end
  tat = math.max(tat + delta * window / limit, now)
  if tat <= now then
    redis.call('DEL', key)
  else
    redis.call('SET', key, num(tat), 'PX', math.ceil(tat - now))
  end
end

local function windows(key, sliding, window, ref, delta)
  local stored = redis.call('HMGET', key, 'w', 'c', 'p')
  local w = tonumber(stored[1])
  if not w then
    return
  end
  local current_window = math.floor(now / window)
  local current, previous = tonumber(stored[2]) or 0, tonumber(stored[3]) or 0
  if w ~= current_window then -- roll forward first, as a take would
    if sliding and w == current_window - 1 then
      previous = current
    else
      previous = 0
    end
    current = 0
  end
  local target = tonumber(ref)
  if target == current_window then
    current = math.max(0, current + delta)
  elseif sliding and target == current_window - 1 then
    previous = math.max(0, previous + delta)
  else
    return -- that window has gone
  end
  local span = 1
  if sliding then
    span = 2
    redis.call('HSET', key, 'w', current_window, 'c', current, 'p', previous)
  else
    redis.call('HSET', key, 'w', current_window, 'c', current)
  end
  redis.call('PEXPIRE', key, math.ceil((current_window + span) * window - now))
end

-- Slots are numbered from 0 and held contiguously: release from the top, add on top. What the
-- request holds now counts, not the receipt's amount, so repeated adjustments add up.
local function leases(key, window, request_id, delta)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', num(now))
  local held = 0
  for _ = 1, redis.call('ZCARD', key) do
    if not redis.call('ZSCORE', key, request_id .. '#' .. held) then
      break
    end
    held = held + 1
  end
  if delta < 0 then
    for slot = math.max(0, held + delta), held - 1 do
      redis.call('ZREM', key, request_id .. '#' .. slot)
    end
  elseif held > 0 then -- nothing to extend once its lease has ended or it was released
    local ends = num(now + window)
    for slot = held, held + delta - 1 do
      redis.call('ZADD', key, ends, request_id .. '#' .. slot)
    end
  end
  local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  if last[2] then
    redis.call('PEXPIRE', key, math.ceil(tonumber(last[2]) - now))
  end
end

for i, key in ipairs(KEYS) do
  local base = (i - 1) * 7
  local algorithm = tonumber(ARGV[base + 1])
  local limit = tonumber(ARGV[base + 2])
  local window = tonumber(ARGV[base + 3])
  local ref = ARGV[base + 6]
  local delta = tonumber(ARGV[base + 7])
  if delta ~= 0 then
    if algorithm == 1 then
      gcra(key, limit, window, delta)
    elseif algorithm == 4 then
      leases(key, window, ref, delta)
    else
      windows(key, algorithm == 2, window, ref, delta)
    end
  end
end
return 0
