-- Mark the step aborted and wake every waiting rank and the committer's reader. Once
-- the committer claimed the step only the committer can abort it.
-- KEYS: gen, step, ranks, reports, done, wake.
-- ARGV: gen, waiting ranks, reason, step TTL, in-flight TTL, '1' when the committer
-- aborts, attempt.
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] then return {'FENCED', cur} end
local rel, st = relation(KEYS[2], ARGV[1], tonumber(ARGV[7]))
if rel == 'newer' then return {'OTHER', ''} end
if rel == 'mine' and st == 'committed' then return {'COMMITTED', ''} end
if rel == 'mine' and st == 'aborted' then return {'OK', ''} end
if rel == 'mine' and st == 'committing' and ARGV[6] ~= '1' then return {'COMMITTING', ''} end
redis.call('HSET', KEYS[2], 'state', 'aborted', 'gen', ARGV[1], 'attempt', ARGV[7], 'reason', ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('UNLINK', KEYS[3])
redis.call('XADD', KEYS[4], '*', 'abort', ARGV[3])
redis.call('EXPIRE', KEYS[4], ARGV[5])
redis.call('RPUSH', KEYS[6], 'abort')
redis.call('EXPIRE', KEYS[6], ARGV[5])
wake_waiters(KEYS[5], 'aborted', tonumber(ARGV[2]), ARGV[5])
return {'OK', ''}
