-- The committer, before publishing the manifest: its generation is still current and
-- the step neither committed nor aborted.
-- The step joins ``claimed`` until COMMIT indexes it: should Redis die in between, a
-- reader of the index asks storage whether the manifest was published.
-- KEYS: gen, step, claimed. ARGV: gen, world, step TTL, attempt, step.
local refused, rel, st = check_caller(KEYS[1], KEYS[2], ARGV[1], tonumber(ARGV[4]))
if refused then return refused end
if rel == 'mine' and st == 'committed' then return {'COMMITTED', ''} end
if rel == 'mine' and st == 'aborted' then
  return {'ABORTED', redis.call('HGET', KEYS[2], 'reason') or ''}
end
redis.call('HSET', KEYS[2], 'state', 'committing', 'gen', ARGV[1], 'attempt', ARGV[4], 'world', ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[5])
return {'OK', ''}
