-- A non-committer's data is durable: record its report and wake the committer's reader
-- when the count reaches the next batch.
-- KEYS: gen, step, ranks, reports, wake.
-- ARGV: gen, rank, index JSON, world, step TTL, in-flight TTL, smallest batch, attempt.
local refused, rel, st = check_caller(KEYS[1], KEYS[2], ARGV[1], tonumber(ARGV[8]))
if refused then return refused end
if rel == 'older' then
  -- Even a commit by an earlier save is history here: its manifest may have been
  -- deleted since; if it is still there, the atomic create of ours refuses.
  redis.call('DEL', KEYS[2])
  st = false
end
if st == 'committed' then return {'COMMITTED', ''} end
if st == 'aborted' then return {'ABORTED', redis.call('HGET', KEYS[2], 'reason') or ''} end
if redis.call('SADD', KEYS[3], ARGV[2]) == 0 then
  return {'OK', tostring(redis.call('SCARD', KEYS[3]))}
end
local n = redis.call('SCARD', KEYS[3])
if st then
  redis.call('HSET', KEYS[2], 'last_report_us', now_us())
else
  redis.call('HSET', KEYS[2], 'state', 'open', 'gen', ARGV[1], 'attempt', ARGV[8], 'world', ARGV[4],
             'last_report_us', now_us())
  redis.call('EXPIRE', KEYS[2], ARGV[5])
end
redis.call('XADD', KEYS[4], '*', 'rank', ARGV[2], 'index', ARGV[3])
if n == 1 then
  redis.call('EXPIRE', KEYS[3], ARGV[6])
  redis.call('EXPIRE', KEYS[4], ARGV[6])
end
local expected = tonumber(ARGV[4]) - 1
local smallest = tonumber(ARGV[7])
local wake = n == smallest or n == math.floor(expected / 2) or n == expected
local rest = smallest
while not wake and rest < expected / 2 do
  wake = n == expected - rest
  rest = rest * 4
end
if wake then
  redis.call('RPUSH', KEYS[5], n)
  redis.call('EXPIRE', KEYS[5], ARGV[6])
end
return {'OK', tostring(n)}
