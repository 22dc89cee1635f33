-- Admin: decide a checkpoint, set a task's ceiling, or reset a task; with the audit entry of what was done.
--
-- KEYS[1] task   KEYS[2] the tenant's audit stream
-- ARGV[1] action: 'approve', 'deny', 'ceiling' or 'reset'   ARGV[2] now (ms)   ARGV[3] task retention (ms)
-- approve: ARGV[4] checkpoint id, ARGV[5] tokens to add, ARGV[6] micro-USD to add,
--          ARGV[7] highest token ceiling, ARGV[8] highest micro-USD ceiling
-- deny:    ARGV[4] checkpoint id
-- ceiling: ARGV[4] 'set' or 'add', ARGV[5] tokens (or '' to leave), ARGV[6] micro-USD (or '' to leave),
--          ARGV[7] highest token ceiling, ARGV[8] highest micro-USD ceiling, ARGV[9] request id ('': none)
-- every action: ARGV[10] the audit entry as the caller knows it (JSON: who, role, from where, what was asked;
--          '': no entry), ARGV[11] audit entries kept at most, ARGV[12] how long audit entries are kept (ms)
--          ARGV[13] the notification stream's cap (absent or 0: no events), ARGV[14] its retention (ms): a decided
--          checkpoint is notified (see notify_append in _lib.lua), with who decided it (the audit entry's 'who')
--
-- Returns { outcome, then the task's limit, used, reserved, limit_usd, used_usd, reserved_usd, then, for a refusal of
-- an amount (10, 11), the ceiling field it is about: 'limit' or 'limit_usd' }
-- outcome: 1 approved, 2 already approved, 3 denied, 4 already denied, 5 no such checkpoint, 6 decided the other
-- way, 7 ceiling set, 8 ceiling request seen before (nothing applied again), 9 the request id was used for another
-- change, 10 no ceiling to add to yet (the task's first check fixes it), 11 the sum would pass the highest ceiling,
-- 12 task reset, 13 nothing to reset.
-- Refusals (9 to 11) write nothing but the audit entry, which every outcome gets: it holds the caller's entry, the
-- outcome and the task's counter before and after.

local task_key = KEYS[1]
local action = ARGV[1]
local now = tonumber(ARGV[2])
local CEILINGS = { 'limit', 'limit_usd' }
local before = task_counter(task_key)
local notify = { ARGV[13] or '0', ARGV[14] or '0' }

-- Who made the change, from the caller's audit entry (JSON), for the notification.
local function decided_by()
  if (ARGV[10] or '') == '' then return '' end
  local ok, entry = pcall(cjson.decode, ARGV[10])
  if ok and type(entry) == 'table' and type(entry.who) == 'string' then return entry.who end
  return ''
end

local function done(outcome, field)
  local out = { outcome }
  local after = task_counter(task_key)
  append_counter(out, after)
  if field then out[#out + 1] = field end
  if (ARGV[10] or '') ~= '' then  -- no entry (nor stream) given: nothing to record
    local entry = { 'entry', ARGV[10], 'outcome', outcome, 'before', counter_text(before), 'after', counter_text(after) }
    if field then
      entry[#entry + 1] = 'field'
      entry[#entry + 1] = field
    end
    audit_append(KEYS[2], entry, ARGV[11], ARGV[12])
  end
  return out
end

-- Why `amount` cannot be added to a ceiling, or nil when it can: 10 when the task has no ceiling yet (its first
-- check fixes it, from the task type), 11 when the sum would pass `highest`. No ceiling (LIMIT_NONE) stays none.
local function cannot_add(field, amount, highest)
  local current = redis.call('HGET', task_key, field)
  if not current then return 10 end
  current = tonumber(current)
  if current ~= LIMIT_NONE and amount > 0 and current + amount > highest then return 11 end
  return nil
end

-- Adds to a ceiling checked by cannot_add; the amount goes to HINCRBY as the caller's text, never a Lua number.
local function add_to(field, amount)
  local current = redis.call('HGET', task_key, field)
  if current and tonumber(current) ~= LIMIT_NONE and tonumber(amount) ~= 0 then
    redis.call('HINCRBY', task_key, field, amount)
  end
end

if action == 'reset' then
  -- The task's open checkpoint leaves the index with it; its decided ones stay listed as decisions.
  local open = redis.call('HGET', task_key, 'checkpoint')
  if open then
    local prefix = tenant_prefix(task_key)
    redis.call('ZREM', prefix .. 'ckpt:open', open)
    redis.call('DEL', checkpoint_info_key(prefix, open))
  end
  if redis.call('DEL', task_key) == 1 then return done(12) end
  return done(13)
end

if action == 'ceiling' then
  local mode, request = ARGV[4], ARGV[9]
  -- A request id makes the call idempotent: a retry (also the Redis client's own, after a dropped connection) of a
  -- change already made is answered without applying it again.
  local marker, change = 'ceiling:' .. request, mode .. ' ' .. ARGV[5] .. ' ' .. ARGV[6]
  if request ~= '' then
    local seen = redis.call('HGET', task_key, marker)
    if seen == change then return done(8) end
    if seen then return done(9) end
  end
  -- Every field is checked before any is written: a refusal leaves the task as it was.
  if mode == 'add' then
    for i, field in ipairs(CEILINGS) do
      if ARGV[4 + i] ~= '' then
        local refused = cannot_add(field, tonumber(ARGV[4 + i]), tonumber(ARGV[6 + i]))
        if refused then return done(refused, field) end
      end
    end
  end
  for i, field in ipairs(CEILINGS) do
    local value = ARGV[4 + i]
    if value ~= '' then
      if mode == 'set' then redis.call('HSET', task_key, field, value) else add_to(field, value) end
    end
  end
  if request ~= '' then redis.call('HSET', task_key, marker, change) end
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
  for i, field in ipairs(CEILINGS) do
    if cannot_add(field, tonumber(ARGV[4 + i]), tonumber(ARGV[6 + i])) == 11 then return done(11, field) end
  end
  for i, field in ipairs(CEILINGS) do add_to(field, ARGV[4 + i]) end
  checkpoint_decided(task_key, id, 'approved', ARGV[5], ARGV[6], now, tonumber(ARGV[3]))
  notify_checkpoint(task_key, notify, 'approved', id, now,
    { 'added', ARGV[5], 'added_usd', ARGV[6], 'by', decided_by() })
  redis.call('HDEL', task_key, 'checkpoint', 'checkpoint_at')
  redis.call('HSET', task_key, 'decided:' .. id, 'approved')
  redis.call('PEXPIRE', task_key, ARGV[3])
  return done(1)
end
-- deny
if decided == 'denied' then return done(4) end
if decided == 'approved' then return done(6) end
if open ~= id then return done(5) end
checkpoint_decided(task_key, id, 'denied', '0', '0', now, tonumber(ARGV[3]))
notify_checkpoint(task_key, notify, 'denied', id, now, { 'by', decided_by() })
redis.call('HDEL', task_key, 'checkpoint', 'checkpoint_at')
redis.call('HSET', task_key, 'decided:' .. id, 'denied', 'closed', '1')
redis.call('PEXPIRE', task_key, ARGV[3])
return done(3)
