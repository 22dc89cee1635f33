-- Admin: decide a checkpoint, or set a task's ceiling.
--
-- KEYS[1] task
-- ARGV[1] action: 'approve', 'deny' or 'ceiling'   ARGV[2] now (ms)   ARGV[3] task retention (ms)
-- approve: ARGV[4] checkpoint id, ARGV[5] tokens to add, ARGV[6] micro-USD to add
-- deny:    ARGV[4] checkpoint id
-- ceiling: ARGV[4] 'set' or 'add', ARGV[5] tokens (or '' to leave), ARGV[6] micro-USD (or '' to leave)
--
-- Returns { outcome, then the task's limit, used, reserved, limit_usd, used_usd, reserved_usd }
-- outcome: 1 approved, 2 already approved, 3 denied, 4 already denied, 5 no such checkpoint, 6 decided the other
-- way, 7 ceiling set.

local task_key = KEYS[1]
local action = ARGV[1]

local function done(outcome)
  local out = { outcome }
  append_counter(out, task_counter(task_key))
  return out
end

local function add_limit(field, amount)
  local current = redis.call('HGET', task_key, field)
  if current and tonumber(current) ~= LIMIT_NONE and amount ~= 0 then redis.call('HINCRBY', task_key, field, amount) end
end

if action == 'ceiling' then
  local mode = ARGV[4]
  for i, field in ipairs({ 'limit', 'limit_usd' }) do
    local value = ARGV[4 + i]
    if value ~= '' then
      if mode == 'set' then
        redis.call('HSET', task_key, field, value)
      else
        -- Adding to a ceiling that does not exist (yet, or at all) changes nothing.
        add_limit(field, tonumber(value))
      end
    end
  end
  -- A task given a ceiling before its first check keeps it: the first check only fills in what is missing.
  redis.call('PEXPIRE', task_key, ARGV[3])
  return done(7)
end

local id = ARGV[4]
local decided = redis.call('HGET', task_key, 'decided:' .. id)
local open = redis.call('HGET', task_key, 'checkpoint')
if action == 'approve' then
  if decided == 'approved' then return done(2) end
  if decided == 'denied' then return done(6) end
  if open ~= id then return done(5) end
  add_limit('limit', tonumber(ARGV[5]))
  add_limit('limit_usd', tonumber(ARGV[6]))
  redis.call('HDEL', task_key, 'checkpoint', 'checkpoint_at')
  redis.call('HSET', task_key, 'decided:' .. id, 'approved')
  redis.call('PEXPIRE', task_key, ARGV[3])
  return done(1)
end
-- deny
if decided == 'denied' then return done(4) end
if decided == 'approved' then return done(6) end
if open ~= id then return done(5) end
redis.call('HDEL', task_key, 'checkpoint', 'checkpoint_at')
redis.call('HSET', task_key, 'decided:' .. id, 'denied', 'closed', '1')
redis.call('PEXPIRE', task_key, ARGV[3])
return done(3)
