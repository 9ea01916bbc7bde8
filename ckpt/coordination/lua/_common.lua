-- Shared by every script of the Redis coordinator: prepended to each at load time.

-- Redis's clock in microseconds, as a string: one clock for every host. The step hash
-- keeps when its last report came and when it was committed (the commit latency).
local function now_us()
  local t = redis.call('TIME')
  return t[1] .. string.format('%06d', tonumber(t[2]))
end

-- How the step hash stands to the caller (generation g, attempt a): 'mine' (g and a),
-- 'older' (another generation, or an earlier save of this step by g: it may be replaced
-- unless it committed), 'newer' (a later save of this step by g: the caller is stale),
-- or 'none'; and the hash's state.
local function relation(key, gen, attempt)
  local h = redis.call('HMGET', key, 'state', 'gen', 'attempt')
  if not h[1] then return 'none', false end
  if h[2] ~= gen then return 'older', h[1] end
  local theirs = tonumber(h[3] or '1')
  if theirs == attempt then return 'mine', h[1] end
  if theirs < attempt then return 'older', h[1] end
  return 'newer', h[1]
end

-- A refusal unless the caller's generation is the job's current one and its save of
-- the step the latest; then the relation and state as above.
local function check_caller(gen_key, step_key, gen, attempt)
  local cur = redis.call('GET', gen_key)
  if not cur then return {'LOST', ''} end
  if cur ~= gen then return {'FENCED', cur} end
  local rel, st = relation(step_key, gen, attempt)
  if rel == 'newer' then return {'ABORTED', 'a later save of this step has begun'} end
  return false, rel, st
end

-- Wake the ranks that wait for the step's outcome: one ``token`` each on the list
-- ``key`` (pushed 1000 at a time: unpack has a stack limit), which expires after ``ttl``.
local function wake_waiters(key, token, waiting, ttl)
  while waiting > 0 do
    local n = math.min(waiting, 1000)
    local batch = {}
    for i = 1, n do batch[i] = token end
    redis.call('RPUSH', key, unpack(batch))
    waiting = waiting - n
  end
  redis.call('EXPIRE', key, ttl)
end
