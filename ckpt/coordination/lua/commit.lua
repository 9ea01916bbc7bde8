-- The committer published the manifest: mark the step committed, index it, drop the
-- step's in-flight keys and wake the waiting ranks.
-- KEYS: gen, step, ranks, reports, committed, done, wake, claimed.
-- ARGV: gen, step, waiting ranks, step TTL, in-flight TTL, attempt.
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] then return {'FENCED', cur} end
if redis.call('HGET', KEYS[2], 'state') == 'committed' then return {'OK', ''} end
redis.call('HSET', KEYS[2], 'state', 'committed', 'gen', ARGV[1], 'attempt', ARGV[6], 'committed_us', now_us())
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('ZADD', KEYS[5], ARGV[2], ARGV[2])
redis.call('ZREM', KEYS[8], ARGV[2])
redis.call('UNLINK', KEYS[3], KEYS[4], KEYS[7])
wake_waiters(KEYS[6], 'committed', tonumber(ARGV[3]), ARGV[5])
return {'OK', ''}
