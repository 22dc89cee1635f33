-- Check: for each step of a batch of one tenant, in order, reserve the first candidate that fits every scope, on all of
-- them at once, or reserve nothing; open a checkpoint when only the task's checkpoint threshold stands in the way.
-- Each check is decided exactly as if it ran alone after the checks before it in the batch; a unary check is a batch
-- of one.
--
-- KEYS[1] tenant leases   KEYS[2 .. 1+nwin] tenant windows, in plan order
-- then per check: KEYS reservation record, task
-- ARGV[1] now (ms)   ARGV[2] record retention after the lease (ms)   ARGV[3] reservation key prefix
-- ARGV[4] task retention (ms)   ARGV[5] number of windows (nwin)
-- then per window: token limit, micro-USD limit (-1: none), alive-until (ms)
-- then per check one argument, its fields joined by \31 (the unit separator: ids never hold control characters):
--   lease expiry (ms), ceiling of a new task in tokens (-1: none), in micro-USD (-1: none),
--   soft threshold of a new task (basis points, -1: none), checkpoint threshold (likewise),
--   task id, task type, step id, checkpoint id prefix,
--   then per candidate: tokens, micro-USD, bound (0: soft threshold, 1: checkpoint), and the decision it stands for
--   (recorded on the reservation for the usage event, e.g. ALLOW or DEGRADE:rung), preceded by the prices and name of
--   the model the candidate runs on (see candidate_label)
--
-- Returns one reply per check, in order:
--   { status, fitted (0-based, -1: none), granted tokens, granted micro-USD, lease expiry, checkpoint id,
--     task soft bp, task checkpoint bp, then per scope (task, then windows): limit, used, reserved, limit_usd,
--     used_usd, reserved_usd }
-- status: 0 nothing reserved, 1 reserved now, 2 replay of an earlier reservation of this step,
--         3 the task is at a checkpoint, 4 the task is closed.
-- A malformed argument or a wrong number of keys is an error reply, before anything is written.

local leases = KEYS[1]
local now = tonumber(ARGV[1])
local nwin = tonumber(ARGV[5])
local first_check = 6 + 3 * nwin

-- Every check's argument is parsed and checked before anything is written: a script is not rolled back, so a bad
-- argument half-way would leave the checks before it reserved on the task but not on the windows.
local checks = {}
for n = first_check, #ARGV do
  local f = fields(ARGV[n])
  if #f < 9 or (#f - 9) % 4 ~= 0 or not whole(f[1]) then
    return redis.error_reply('check argument ' .. (n - first_check) .. ' is malformed')
  end
  for at = 10, #f, 4 do
    if not (whole(f[at]) and whole(f[at + 1])) then
      return redis.error_reply('check argument ' .. (n - first_check) .. ' has a malformed candidate')
    end
  end
  checks[#checks + 1] = f
end
if #KEYS ~= 1 + nwin + 2 * #checks then
  return redis.error_reply('expected ' .. (1 + nwin + 2 * #checks) .. ' keys, got ' .. #KEYS)
end

purge_expired(leases, ARGV[3], now, batch_sweep(#checks))

-- The windows are read once per batch and kept here; what the batch reserves on them is written once, at the end.
local windows, win_keys, win_until, win_touched = {}, {}, {}, {}
local win_added, win_added_usd = {}, {}
for i = 1, nwin do
  local at = 6 + 3 * (i - 1)
  win_keys[i], win_until[i] = KEYS[1 + i], ARGV[at + 2]
  windows[i] = window_counter(win_keys[i], ARGV[at], ARGV[at + 1])
  win_touched[i], win_added[i], win_added_usd[i] = false, 0, 0
end
local scope_list = table.concat(win_keys, ' ')
local until_list = table.concat(win_until, ' ')

local TASK_FIELDS = { 'closed', 'checkpoint', 'soft_bp', 'ckpt_bp', 'limit', 'used', 'reserved', 'limit_usd',
  'used_usd', 'reserved_usd', 'init' }

-- The task's state: closed, open checkpoint, thresholds, its counter (limits -1 when none), and whether a check has
-- initialised it.
local function read_task(task_key)
  local f = redis.call('HMGET', task_key, unpack(TASK_FIELDS))
  local counter = { tonumber(f[5] or LIMIT_NONE), num(f[6]), num(f[7]), tonumber(f[8] or LIMIT_NONE), num(f[9]),
    num(f[10]) }
  return f[1], f[2], tonumber(f[3] or LIMIT_NONE), tonumber(f[4] or LIMIT_NONE), counter, f[11]
end

local function reply(head, soft_bp, ckpt_bp, task)
  head[7], head[8] = soft_bp, ckpt_bp
  append_counter(head, task)
  for i = 1, nwin do append_counter(head, windows[i]) end
  return head
end

local retained = {}

local function check(resv_key, task_key, f)
  -- The same step checked again gets the same reservation while it is held or after it was reported. A released or
  -- lapsed one holds nothing any more, so the step may reserve again.
  local existing = redis.call('HMGET', resv_key, 'state', 'amount', 'amount_usd', 'lease', 'gen')
  if existing[1] == 'reserved' or existing[1] == 'reported' then
    local _, _, soft_bp, ckpt_bp, task = read_task(task_key)
    return reply({ 2, 0, num(existing[2]), num(existing[3]), num(existing[4]), '' }, soft_bp, ckpt_bp, task)
  end

  local closed, open_checkpoint, soft_bp, ckpt_bp, task, initialised = read_task(task_key)
  if not initialised then
    -- The first check fixes the task's ceiling and thresholds. Usage reported before it stays counted, and a
    -- ceiling an operator set before it stays in force.
    redis.call('HSET', task_key, 'init', 1)
    redis.call('HSETNX', task_key, 'limit', f[2])
    redis.call('HSETNX', task_key, 'limit_usd', f[3])
    redis.call('HSET', task_key, 'soft_bp', f[4], 'ckpt_bp', f[5], 'task_id', f[6], 'task_type', f[7])
    closed, open_checkpoint, soft_bp, ckpt_bp, task = read_task(task_key)
  end
  if not retained[task_key] then  -- once per task and batch: the same retention from the same now
    redis.call('PEXPIRE', task_key, ARGV[4])
    retained[task_key] = true
  end
  if closed == '1' then return reply({ 4, -1, 0, 0, 0, '' }, soft_bp, ckpt_bp, task) end
  if open_checkpoint then return reply({ 3, -1, 0, 0, 0, open_checkpoint }, soft_bp, ckpt_bp, task) end

  local ckpt, ckpt_usd = threshold(task[1], ckpt_bp), threshold(task[4], ckpt_bp)
  local soft, soft_usd = ckpt, ckpt_usd
  if soft_bp ~= LIMIT_NONE then soft, soft_usd = threshold(task[1], soft_bp), threshold(task[4], soft_bp) end

  local stopped_by_checkpoint = false
  for c = 0, (#f - 9) / 4 - 1 do
    local at = 10 + 4 * c
    local tokens, usd, bound = tonumber(f[at]), tonumber(f[at + 1]), f[at + 2]
    local windows_fit = true
    for i = 1, nwin do
      if not fits(windows[i], tokens, usd, windows[i][1], windows[i][4]) then windows_fit = false; break end
    end
    local task_fits
    if bound == '0' then task_fits = fits(task, tokens, usd, soft, soft_usd)
    else task_fits = fits(task, tokens, usd, ckpt, ckpt_usd) end
    if windows_fit and task_fits then
      local lease_until = tonumber(f[1])
      redis.call('HINCRBY', task_key, 'reserved', tokens)
      if usd ~= 0 then redis.call('HINCRBY', task_key, 'reserved_usd', usd) end
      redis.call('HINCRBY', task_key, 'active', 1)
      task[3], task[6] = task[3] + tokens, task[6] + usd
      for i = 1, nwin do
        windows[i][3], windows[i][6] = windows[i][3] + tokens, windows[i][6] + usd
        win_added[i], win_added_usd[i], win_touched[i] = win_added[i] + tokens, win_added_usd[i] + usd, true
      end
      -- A step reserved again (after a release or a lapse) starts a new generation: its keyless report counts anew.
      if existing[1] then redis.call('DEL', resv_key) end
      local scopes, untils = task_key, '0'
      if nwin > 0 then scopes, untils = scopes .. ' ' .. scope_list, untils .. ' ' .. until_list end
      local admitted, model, p_in, p_cached, p_out = candidate_label(f[at + 3])
      redis.call('HSET', resv_key, 'state', 'reserved', 'gen', num(existing[5]) + 1, 'amount', tokens,
        'amount_usd', usd, 'lease', f[1], 'scopes', scopes, 'untils', untils, 'step_id', f[8], 'admitted', admitted,
        'model', model, 'price_in', p_in, 'price_cached', p_cached, 'price_out', p_out)
      redis.call('PEXPIRE', resv_key, math.max(1, lease_until - now) + tonumber(ARGV[2]))
      redis.call('ZADD', leases, lease_until, string.match(resv_key, '([^:]+)$'))
      return reply({ 1, c, tokens, usd, lease_until, '' }, soft_bp, ckpt_bp, task)
    end
    -- The windows have room but the task's checkpoint line (not the soft one) is in the way.
    if windows_fit and ckpt_bp ~= LIMIT_NONE and not fits(task, tokens, usd, ckpt, ckpt_usd) then
      stopped_by_checkpoint = true
    end
  end

  if stopped_by_checkpoint then
    local n = redis.call('HINCRBY', task_key, 'checkpoints', 1)
    local id = f[9] .. n
    redis.call('HSET', task_key, 'checkpoint', id, 'checkpoint_at', now)
    return reply({ 3, -1, 0, 0, 0, id }, soft_bp, ckpt_bp, task)
  end
  return reply({ 0, -1, 0, 0, 0, '' }, soft_bp, ckpt_bp, task)
end

local out = {}
for n = 1, #checks do
  out[n] = check(KEYS[nwin + 2 * n], KEYS[nwin + 2 * n + 1], checks[n])
end

for i = 1, nwin do
  if win_touched[i] then
    redis.call('HINCRBY', win_keys[i], 'reserved', win_added[i])
    if win_added_usd[i] ~= 0 then redis.call('HINCRBY', win_keys[i], 'reserved_usd', win_added_usd[i]) end
    redis.call('PEXPIRE', win_keys[i], math.max(1, tonumber(win_until[i]) - now))
  end
end
return out
