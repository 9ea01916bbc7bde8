-- A rank's heartbeat. KEYS: hb. ARGV: rank, key TTL (s). The score is Redis's clock, so
-- hosts need not agree.
local t = redis.call('TIME')
redis.call('ZADD', KEYS[1], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
