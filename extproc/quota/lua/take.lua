-- Checks every take against its counter at the store's time, then applies all of them or none.
-- The same arithmetic as extproc/quota/memory.py; store.py states the semantics.
--
-- KEYS[i]: take i's counter (all share one hash tag). ARGV[1]: the request id; then 6 values
-- per take: algorithm (1 gcra, 2 sliding window, 3 fixed window, 4 concurrency), limit,
-- window_ms, burst, amount, up_to (window algorithms: when amount fits, also grant what fits
-- beyond it, up to this in all; 0 for none).
-- Returns {admitted, then per take: allowed, remaining, reset_ms, retry_after_ms, window,
-- granted} (window: the window index a window take landed in, else 0).

local EPS_MS = 0.001    -- absorbs float rounding in GCRA sums (one microsecond)
local EPS_COUNT = 1e-9  -- the same for sliding-window estimates

local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + tonumber(clock[2]) / 1000
local request_id = ARGV[1]

local function num(x)
  return string.format('%.17g', x)
end

-- One pending state per key: read once, changed by each take that fits, written back only when
-- every take fits.
local pending = {}
local order = {}

local function load(key, algorithm, window)
  local state = pending[key]
  if state then
    return state
  end
  state = {algorithm = algorithm, window_ms = window}
  if algorithm == 1 then
    state.tat = tonumber(redis.call('GET', key)) or now
  elseif algorithm == 4 then
    -- Ended leases are gone whatever this call decides.
    redis.call('ZREMRANGEBYSCORE', key, '-inf', num(now))
    state.count = redis.call('ZCARD', key)
    state.added = {}
  else
    local stored = redis.call('HMGET', key, 'w', 'c', 'p')
    local w = tonumber(stored[1])
    state.window = math.floor(now / window)
    state.current, state.previous = 0, 0
    if w == state.window then
      state.current, state.previous = tonumber(stored[2]) or 0, tonumber(stored[3]) or 0
    elseif w == state.window - 1 then
      state.previous = tonumber(stored[2]) or 0
    end
  end
  pending[key] = state
  order[#order + 1] = key
  return state
end

local function gcra(state, limit, window, burst, n)
  local interval = window / limit
  if burst <= 0 then
    burst = limit
  end
  local tolerance = burst * interval
  local base = math.max(state.tat, now)
  local diff = base + n * interval - now
  if diff <= tolerance + EPS_MS then
    state.tat = base + n * interval
    return 1, math.floor((tolerance - diff + EPS_MS) / interval), math.ceil(diff - EPS_MS), 0
  end
  local remaining = math.max(0, math.floor((tolerance - (base - now) + EPS_MS) / interval))
  local reset = math.max(0, math.ceil(base - now - EPS_MS))
  return 0, remaining, reset, math.max(1, math.ceil(diff - tolerance - EPS_MS))
end

local function sliding(state, limit, window, n)
  local elapsed = now - state.window * window
  local estimate = state.previous * (1 - elapsed / window) + state.current
  local reset = math.ceil(window - elapsed)
  if estimate + n <= limit + EPS_COUNT then
    state.current = state.current + n
    return 1, math.max(0, math.floor(limit - estimate - n + EPS_COUNT)), reset, 0
  end
  local remaining = math.max(0, math.floor(limit - estimate + EPS_COUNT))
  local retry
  if state.current + n > limit then
    retry = reset
  else
    local room = limit - state.current - n
    retry = math.ceil(window * (1 - room / state.previous) - elapsed)
  end
  return 0, remaining, reset, math.max(1, retry)
end

local function fixed(state, limit, window, n)
  local reset = math.ceil((state.window + 1) * window - now)
  if state.current + n <= limit then
    state.current = state.current + n
    return 1, limit - state.current, reset, 0
  end
  return 0, math.max(0, limit - state.current), reset, math.max(1, reset)
end

local function leases(key, state, limit, window, n)
  -- A request id taking again re-uses (and refreshes) the slots it already holds.
  local existing = 0
  for slot = 0, n - 1 do
    local member = request_id .. '#' .. slot
    if state.added[member] or redis.call('ZSCORE', key, member) then
      existing = existing + 1
    end
  end
  local after = state.count + n - existing
  if after <= limit then
    local ends = now + window
    for slot = 0, n - 1 do
      state.added[request_id .. '#' .. slot] = ends
    end
    state.count = after
    return 1, limit - after, 0, 0
  end
  -- Until enough of the leases held now end, if nobody releases earlier.
  local need = after - limit
  local nth = redis.call('ZRANGE', key, need - 1, need - 1, 'WITHSCORES')
  local retry = window
  if nth[2] then
    retry = math.ceil(tonumber(nth[2]) - now)
  end
  return 0, math.max(0, limit - state.count), 0, math.max(1, retry)
end

local function window_take(state, algorithm, limit, window, burst, n)
  if algorithm == 1 then
    return gcra(state, limit, window, burst, n)
  elseif algorithm == 2 then
    return sliding(state, limit, window, n)
  end
  return fixed(state, limit, window, n)
end

local reply = {1}
local admitted = true
for i, key in ipairs(KEYS) do
  local base = 1 + (i - 1) * 6
  local algorithm = tonumber(ARGV[base + 1])
  local limit = tonumber(ARGV[base + 2])
  local window = tonumber(ARGV[base + 3])
  local burst = tonumber(ARGV[base + 4])
  local n = tonumber(ARGV[base + 5])
  local up_to = tonumber(ARGV[base + 6])
  local state = load(key, algorithm, window)
  local allowed, remaining, reset, retry
  local granted = n
  if algorithm == 4 then
    allowed, remaining, reset, retry = leases(key, state, limit, window, n)
  else
    allowed, remaining, reset, retry = window_take(state, algorithm, limit, window, burst, n)
    local extra = math.min(up_to - n, remaining)
    if allowed == 1 and extra > 0 then
      local more, more_remaining, more_reset, more_retry =
        window_take(state, algorithm, limit, window, burst, extra)
      if more == 1 then -- always, by the first verdict's arithmetic
        remaining, reset, retry = more_remaining, more_reset, more_retry
        granted = n + extra
      end
    end
  end
  if allowed == 0 then
    admitted = false
  end
  local n_reply = #reply
  reply[n_reply + 1] = allowed
  reply[n_reply + 2] = remaining
  reply[n_reply + 3] = reset
  reply[n_reply + 4] = retry
  reply[n_reply + 5] = state.window or 0
  reply[n_reply + 6] = granted
end

if not admitted then
  reply[1] = 0
  return reply
end

for _, key in ipairs(order) do
  local state = pending[key]
  local algorithm = state.algorithm
  local window = state.window_ms
  if algorithm == 1 then
    if state.tat > now then
      redis.call('SET', key, num(state.tat), 'PX', math.ceil(state.tat - now))
    end
  elseif algorithm == 4 then
    if next(state.added) ~= nil then
      for member, ends in pairs(state.added) do
        redis.call('ZADD', key, num(ends), member)
      end
      local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
      redis.call('PEXPIRE', key, math.ceil(tonumber(last[2]) - now))
    end
  else
    -- A sliding window's count still weighs on the next window.
    local span = 1
    if algorithm == 2 then
      span = 2
      redis.call('HSET', key, 'w', state.window, 'c', state.current, 'p', state.previous)
    else
      redis.call('HSET', key, 'w', state.window, 'c', state.current)
    end
    redis.call('PEXPIRE', key, math.ceil((state.window + span) * window - now))
  end
end
return reply
