-- Check: reserve the first candidate that fits every scope, on all of them at once, or reserve nothing; open a
-- checkpoint when only the task's checkpoint threshold stands in the way.
--
-- KEYS[1] reservation record   KEYS[2] tenant leases   KEYS[3] task   KEYS[4..] tenant windows, in plan order
-- ARGV[1] now (ms)   ARGV[2] lease expiry (ms)   ARGV[3] record retention after the lease (ms)
-- ARGV[4] reservation key prefix   ARGV[5] task retention (ms)
-- ARGV[6] ceiling of a new task in tokens (-1: none)   ARGV[7] in micro-USD (-1: none)
-- ARGV[8] soft threshold of a new task (basis points, -1: none)   ARGV[9] checkpoint threshold (likewise)
-- ARGV[10] task id   ARGV[11] task type   ARGV[12] step id   ARGV[13] checkpoint id prefix
-- then per window: token limit, micro-USD limit (-1: none), alive-until (ms)
-- then the number of candidates and per candidate: tokens, micro-USD, bound (0: soft threshold, 1: checkpoint),
-- and the decision it stands for (recorded on the reservation for the usage event, e.g. ALLOW or DEGRADE:rung)
--
-- Returns { status, fitted (0-based, -1: none), granted tokens, granted micro-USD, lease expiry, checkpoint id,
--           task soft bp, task checkpoint bp, then per scope: limit, used, reserved, limit_usd, used_usd, reserved_usd }
-- status: 0 nothing reserved, 1 reserved now, 2 replay of an earlier reservation of this step,
--         3 the task is at a checkpoint, 4 the task is closed.

local resv_key, leases, task_key = KEYS[1], KEYS[2], KEYS[3]
local now = tonumber(ARGV[1])
local lease_until = tonumber(ARGV[2])
local nwin = #KEYS - 3
local WIN = 13

purge_expired(leases, ARGV[4], now)

local function reply(head)
  local t = redis.call('HMGET', task_key, 'soft_bp', 'ckpt_bp')
  head[#head + 1] = tonumber(t[1] or LIMIT_NONE)
  head[#head + 1] = tonumber(t[2] or LIMIT_NONE)
  append_counter(head, task_counter(task_key))
  for i = 1, nwin do
    local at = WIN + 3 * (i - 1)
    append_counter(head, window_counter(KEYS[3 + i], ARGV[at + 1], ARGV[at + 2]))
  end
  return head
end

-- The same step checked again gets the same reservation while it is held or after it was reported. A released or
-- lapsed one holds nothing any more, so the step may reserve again.
local existing = redis.call('HMGET', resv_key, 'state', 'amount', 'amount_usd', 'lease')
if existing[1] == 'reserved' or existing[1] == 'reported' then
  return reply({ 2, 0, num(existing[2]), num(existing[3]), num(existing[4]), '' })
end

-- The first check fixes the task's ceiling and thresholds. Usage reported before it stays counted, and a ceiling an
-- operator set before it stays in force.
if redis.call('HSETNX', task_key, 'init', 1) == 1 then
  redis.call('HSETNX', task_key, 'limit', ARGV[6])
  redis.call('HSETNX', task_key, 'limit_usd', ARGV[7])
  redis.call('HSET', task_key, 'soft_bp', ARGV[8], 'ckpt_bp', ARGV[9], 'task_id', ARGV[10], 'task_type', ARGV[11])
end
redis.call('PEXPIRE', task_key, ARGV[5])

local state = redis.call('HMGET', task_key, 'closed', 'checkpoint', 'soft_bp', 'ckpt_bp')
if state[1] == '1' then return reply({ 4, -1, 0, 0, 0, '' }) end
if state[2] then return reply({ 3, -1, 0, 0, 0, state[2] }) end

local task = task_counter(task_key)
local soft_bp, ckpt_bp = tonumber(state[3] or LIMIT_NONE), tonumber(state[4] or LIMIT_NONE)
local ckpt, ckpt_usd = threshold(task[1], ckpt_bp), threshold(task[4], ckpt_bp)
local soft, soft_usd = ckpt, ckpt_usd
if soft_bp ~= LIMIT_NONE then soft, soft_usd = threshold(task[1], soft_bp), threshold(task[4], soft_bp) end

local windows = {}
for i = 1, nwin do
  local at = WIN + 3 * (i - 1)
  windows[i] = window_counter(KEYS[3 + i], ARGV[at + 1], ARGV[at + 2])
end

local first = WIN + 3 * nwin + 1
local ncand = tonumber(ARGV[first])
local stopped_by_checkpoint = false
for c = 1, ncand do
  local at = first + 4 * (c - 1)
  local tokens, usd, bound = tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2]), ARGV[at + 3]
  local windows_fit = true
  for i = 1, nwin do
    if not fits(windows[i], tokens, usd, windows[i][1], windows[i][4]) then windows_fit = false; break end
  end
  local task_fits
  if bound == '0' then task_fits = fits(task, tokens, usd, soft, soft_usd)
  else task_fits = fits(task, tokens, usd, ckpt, ckpt_usd) end
  if windows_fit and task_fits then
    local scopes, untils = { task_key }, { '0' }
    redis.call('HINCRBY', task_key, 'reserved', tokens)
    redis.call('HINCRBY', task_key, 'reserved_usd', usd)
    redis.call('HINCRBY', task_key, 'active', 1)
    for i = 1, nwin do
      local key, alive_until = KEYS[3 + i], ARGV[WIN + 3 * (i - 1) + 3]
      redis.call('HINCRBY', key, 'reserved', tokens)
      redis.call('HINCRBY', key, 'reserved_usd', usd)
      redis.call('PEXPIRE', key, math.max(1, tonumber(alive_until) - now))
      scopes[#scopes + 1], untils[#untils + 1] = key, alive_until
    end
    -- A step reserved again (after a release or a lapse) starts a new generation: its keyless report counts anew.
    local generation = num(redis.call('HGET', resv_key, 'gen')) + 1
    redis.call('DEL', resv_key)
    redis.call('HSET', resv_key, 'state', 'reserved', 'gen', generation, 'amount', tokens, 'amount_usd', usd,
      'lease', lease_until, 'scopes', table.concat(scopes, ' '), 'untils', table.concat(untils, ' '),
      'step_id', ARGV[12], 'admitted', ARGV[at + 4])
    redis.call('PEXPIRE', resv_key, math.max(1, lease_until - now) + tonumber(ARGV[3]))
    redis.call('ZADD', leases, lease_until, string.match(resv_key, '([^:]+)$'))
    return reply({ 1, c - 1, tokens, usd, lease_until, '' })
  end
  -- The windows have room but the task's checkpoint line (not the soft one) is in the way.
  if windows_fit and ckpt_bp ~= LIMIT_NONE and not fits(task, tokens, usd, ckpt, ckpt_usd) then
    stopped_by_checkpoint = true
  end
end

if stopped_by_checkpoint then
  local n = redis.call('HINCRBY', task_key, 'checkpoints', 1)
  local id = ARGV[13] .. n
  redis.call('HSET', task_key, 'checkpoint', id, 'checkpoint_at', now)
  return reply({ 3, -1, 0, 0, 0, id })
end
return reply({ 0, -1, 0, 0, 0, '' })
