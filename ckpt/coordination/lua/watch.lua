-- A waiting rank's check. KEYS: gen, step, hb. ARGV: gen, heartbeat TTL (ms), whom to
-- watch: '*' for every rank (the committer: the number of heartbeats and up to 64
-- stale ranks) or one rank (a non-committer watches the committer: '1' when stale);
-- attempt.
local refused, rel, st = check_caller(KEYS[1], KEYS[2], ARGV[1], tonumber(ARGV[4]))
if refused then return refused end
if rel == 'mine' and st == 'aborted' then
  return {'ABORTED', redis.call('HGET', KEYS[2], 'reason') or ''}
end
if rel == 'mine' and st == 'committed' then return {'COMMITTED', ''} end
local t = redis.call('TIME')
local oldest = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(ARGV[2])
if ARGV[3] == '*' then
  local out = {'OK', tostring(redis.call('ZCARD', KEYS[3]))}
  local stale = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', string.format('(%d', oldest), 'LIMIT', 0, 64)
  for i = 1, #stale do out[#out + 1] = stale[i] end
  return out
end
local seen = redis.call('ZSCORE', KEYS[3], ARGV[3])
if seen and tonumber(seen) >= oldest then return {'OK', '0'} end
return {'OK', '1'}
