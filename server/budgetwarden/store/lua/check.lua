-- Check: for each step of a batch of one tenant, in order, reserve the first candidate that fits every scope, on all of
-- them at once, or reserve nothing; open a checkpoint when only the task's checkpoint threshold stands in the way.
-- Each check is decided exactly as if it ran alone after the checks before it in the batch; a unary check is a batch
-- of one.
--
-- KEYS[1] tenant leases   KEYS[2 .. 1+nwin] tenant windows, in plan order
-- then per check: KEYS reservation record, task
-- ARGV[1] now (ms)   ARGV[2] record retention after the lease (ms)   ARGV[3] reservation key prefix
-- ARGV[4] task retention (ms)   ARGV[5] number of windows (nwin), then optionally, space-separated, the notification
--   stream's cap (0: no events), its retention (ms) and the fractions of a window's limits that notify when its use
--   (used + reserved) reaches them, in basis points (see notify_append in _lib.lua)
-- then per window: token limit, micro-USD limit (-1: none), alive-until (ms)
-- then per check one argument, its fields joined by \31 (the unit separator: ids never hold control characters):
--   lease expiry (ms), ceiling of a new task in tokens (-1: none), in micro-USD (-1: none),
--   soft threshold of a new task (basis points, -1: none), checkpoint threshold (likewise),
--   task id, task type, step id, checkpoint id prefix,
--   fingerprint of the request (what decides the answer; a re-check must match it to replay),
--   the answer's part common to every candidate (opaque here, made and read by the sidecar),
--   then per candidate: tokens, micro-USD, bound (0: soft threshold, 1: checkpoint), its label: the prices and name
--   of the model the candidate runs on and the decision it stands for (recorded on the reservation for the usage
--   event and for pricing a report that names no model, e.g. ALLOW or DEGRADE:rung; see candidate_label), and the
--   answer's part of this candidate (opaque here)
--
-- A reservation record keeps, besides what it holds, what the check answered, so that checking the step again
-- answers the same without the policy (which may have changed since): 'fp' the fingerprint, and 'answer' = the
-- common part, \30, the candidate's part, and for a candidate other than ALLOW (a degraded grant, which is explained
-- from the counters) \30 and the tail of the reply it got (soft bp, checkpoint bp, the scopes' figures), in decimal,
-- space-separated.
--
-- Returns one reply per check, in order:
--   { status, fitted (0-based, -1: none), granted tokens, granted micro-USD, lease expiry, detail,
--     task soft bp, task checkpoint bp, then per scope (task, then windows): limit, used, reserved, limit_usd,
--     used_usd, reserved_usd }
-- detail: the checkpoint id (status 3), the stored answer (status 2; '' for a record from before answers were
-- stored), else ''. The figures are the current ones, also for a replay.
-- status: 0 nothing reserved, 1 reserved now, 2 replay of an earlier reservation of this step (same fingerprint),
--         3 the task is at a checkpoint, 4 the task is closed, 5 the step holds a reservation made for a different
--         request (nothing written; a record without a fingerprint replays).
-- Only a reservation is replayed: a check that reserved nothing (deny, checkpoint) leaves no record, and one whose
-- reservation was released or lapsed reserves anew.
-- A malformed argument or a wrong number of keys is an error reply, before anything is written.

local leases = KEYS[1]
local now = tonumber(ARGV[1])
local window_config = words(ARGV[5])
local nwin = tonumber(window_config[1])
local notify = { window_config[2] or '0', window_config[3] or '0' }
local notify_fractions = {}
for i = 4, #window_config do notify_fractions[#notify_fractions + 1] = tonumber(window_config[i]) end
local first_check = 6 + 3 * nwin

-- Every check's argument is parsed and checked before anything is written: a script is not rolled back, so a bad
-- argument half-way would leave the checks before it reserved on the task but not on the windows.
local checks = {}
for n = first_check, #ARGV do
  local f = fields(ARGV[n])
  if #f < 11 or (#f - 11) % 5 ~= 0 or not whole(f[1]) then
    return redis.error_reply('check argument ' .. (n - first_check) .. ' is malformed')
  end
  for at = 12, #f, 5 do
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
  'used_usd', 'reserved_usd', 'init', 'active' }

-- A task's state as this batch sees it: read from Redis once per task and batch, then kept here, and what the batch
-- reserves on it written back once (flush_task): a batch of many checks of one task costs two calls on its hash, not
-- three or four per check, and a unary check one write instead of two or three HINCRBYs. Nothing else writes these
-- fields while the script runs, so each check sees exactly what it would have read from Redis.
--   closed, checkpoint (open id), soft_bp, ckpt_bp, counter (limits -1 when none), init, active, dirty
local tasks = {}

local function load_task(task_key)
  local f = redis.call('HMGET', task_key, unpack(TASK_FIELDS))
  local state = { closed = f[1], checkpoint = f[2], soft_bp = tonumber(f[3] or LIMIT_NONE),
    ckpt_bp = tonumber(f[4] or LIMIT_NONE),
    counter = { tonumber(f[5] or LIMIT_NONE), num(f[6]), num(f[7]), tonumber(f[8] or LIMIT_NONE), num(f[9]),
      num(f[10]) },
    init = f[11], active = num(f[12]), dirty = false, usd_dirty = false }
  tasks[task_key] = state
  return state
end

local function read_task(task_key)
  return tasks[task_key] or load_task(task_key)
end

-- Writes what the batch reserved on a task (its reserved counters and active reservations) back to its hash. Numbers
-- go as they are: Redis and Valkey write a whole number below 2^53 in plain digits (%.17g or their integer path).
local function flush_task(task_key)
  local state = tasks[task_key]
  if not state or not state.dirty then return end
  local c = state.counter
  if state.usd_dirty then
    redis.call('HSET', task_key, 'reserved', c[3], 'reserved_usd', c[6], 'active', state.active)
  else
    redis.call('HSET', task_key, 'reserved', c[3], 'active', state.active)
  end
  state.dirty, state.usd_dirty = false, false
end

local function reply(head, soft_bp, ckpt_bp, task)
  head[7], head[8] = soft_bp, ckpt_bp
  append_counter(head, task)
  for i = 1, nwin do append_counter(head, windows[i]) end
  return head
end

-- The reply's tail (thresholds and figures) in decimal, space-separated: kept with a degraded grant's answer.
local function figures_text(head)
  local out = {}
  for i = 7, #head do out[#out + 1] = string.format('%d', head[i]) end
  return table.concat(out, ' ')
end

local retained = {}

local function check(resv_key, task_key, f)
  -- The same step checked again with the same request gets the same reservation and answer while it is held or
  -- after it was reported; with another request, nothing. A released or lapsed one holds nothing any more, so the
  -- step may reserve again.
  local existing = redis.call('HMGET', resv_key, 'state', 'amount', 'amount_usd', 'lease', 'gen', 'fp', 'answer')
  if existing[1] == 'reserved' or existing[1] == 'reported' then
    local state = read_task(task_key)
    local soft_bp, ckpt_bp, task = state.soft_bp, state.ckpt_bp, state.counter
    if existing[6] and existing[6] ~= f[10] then return reply({ 5, -1, 0, 0, 0, '' }, soft_bp, ckpt_bp, task) end
    local head = { 2, -1, num(existing[2]), num(existing[3]), num(existing[4]), existing[7] or '' }
    return reply(head, soft_bp, ckpt_bp, task)
  end

  local state = read_task(task_key)
  if not state.init then
    -- The first check fixes the task's ceiling and thresholds. Usage reported before it stays counted, and a
    -- ceiling an operator set before it stays in force.
    flush_task(task_key)
    redis.call('HSET', task_key, 'init', 1)
    redis.call('HSETNX', task_key, 'limit', f[2])
    redis.call('HSETNX', task_key, 'limit_usd', f[3])
    redis.call('HSET', task_key, 'soft_bp', f[4], 'ckpt_bp', f[5], 'task_id', f[6], 'task_type', f[7])
    state = load_task(task_key)
  end
  if not retained[task_key] then  -- once per task and batch: the same retention from the same now
    redis.call('PEXPIRE', task_key, ARGV[4])
    retained[task_key] = true
  end
  local open_checkpoint, soft_bp, ckpt_bp, task = state.checkpoint, state.soft_bp, state.ckpt_bp, state.counter
  if state.closed == '1' then return reply({ 4, -1, 0, 0, 0, '' }, soft_bp, ckpt_bp, task) end
  if open_checkpoint then
    checkpoint_waiting(task_key, open_checkpoint, ARGV[4])
    return reply({ 3, -1, 0, 0, 0, open_checkpoint }, soft_bp, ckpt_bp, task)
  end

  local ckpt, ckpt_usd = threshold(task[1], ckpt_bp), threshold(task[4], ckpt_bp)
  local soft, soft_usd = ckpt, ckpt_usd
  if soft_bp ~= LIMIT_NONE then soft, soft_usd = threshold(task[1], soft_bp), threshold(task[4], soft_bp) end

  local stopped_by_checkpoint = false
  for c = 0, (#f - 11) / 5 - 1 do
    local at = 12 + 5 * c
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
      task[3], task[6] = task[3] + tokens, task[6] + usd
      state.active, state.dirty = state.active + 1, true
      if usd ~= 0 then state.usd_dirty = true end
      for i = 1, nwin do
        windows[i][3], windows[i][6] = windows[i][3] + tokens, windows[i][6] + usd
        win_added[i], win_added_usd[i], win_touched[i] = win_added[i] + tokens, win_added_usd[i] + usd, true
      end
      -- A step reserved again (after a release or a lapse) starts a new generation: its keyless report counts anew.
      if existing[1] then redis.call('DEL', resv_key) end
      local scopes, untils = task_key, '0'
      if nwin > 0 then scopes, untils = scopes .. ' ' .. scope_list, untils .. ' ' .. until_list end
      local out = reply({ 1, c, tokens, usd, lease_until, '' }, soft_bp, ckpt_bp, task)
      local admitted, model, p_in, p_cached, p_out = candidate_label(f[at + 3])
      local answer = f[11] .. '\30' .. f[at + 4]
      if admitted ~= 'ALLOW' then answer = answer .. '\30' .. figures_text(out) end
      redis.call('HSET', resv_key, 'state', 'reserved', 'gen', num(existing[5]) + 1, 'amount', tokens,
        'amount_usd', usd, 'lease', f[1], 'scopes', scopes, 'untils', untils, 'step_id', f[8], 'admitted', admitted,
        'model', model, 'price_in', p_in, 'price_cached', p_cached, 'price_out', p_out, 'fp', f[10], 'answer', answer)
      redis.call('PEXPIRE', resv_key, math.max(1, lease_until - now) + tonumber(ARGV[2]))
      redis.call('ZADD', leases, lease_until, lease_member(resv_key, ARGV[3]))
      return out
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
    state.checkpoint = id
    flush_task(task_key)  -- the event reads the task's counter from its hash
    checkpoint_opened(task_key, id, now, tonumber(ARGV[4]))
    notify_checkpoint(task_key, notify, 'opened', id, now)
    return reply({ 3, -1, 0, 0, 0, id }, soft_bp, ckpt_bp, task)
  end
  return reply({ 0, -1, 0, 0, 0, '' }, soft_bp, ckpt_bp, task)
end

local out = {}
for n = 1, #checks do
  out[n] = check(KEYS[nwin + 2 * n], KEYS[nwin + 2 * n + 1], checks[n])
end
for n = 1, #checks do flush_task(KEYS[nwin + 2 * n + 1]) end

-- The windows' reserved counters as the batch leaves them, in one write each (read at the start, and nothing else
-- writes them while the script runs).
for i = 1, nwin do
  if win_touched[i] then
    if win_added_usd[i] ~= 0 then
      redis.call('HSET', win_keys[i], 'reserved', windows[i][3], 'reserved_usd', windows[i][6])
    else
      redis.call('HSET', win_keys[i], 'reserved', windows[i][3])
    end
    redis.call('PEXPIRE', win_keys[i], math.max(1, tonumber(win_until[i]) - now))
  end
end

-- A window whose use (used + reserved) has reached a notified fraction of a limit: one event per window, unit and
-- fraction, marked on the window's hash (which lives as long as the window). Use pushed up by a report is seen by
-- the tenant's next check.
local UNITS = { { 'tokens', 1, 2, 3 }, { 'usd', 4, 5, 6 } }
if tonumber(notify[1]) > 0 and #notify_fractions > 0 then
  local prefix = tenant_prefix(leases)
  for i = 1, nwin do
    local c = windows[i]
    for _, unit in ipairs(UNITS) do
      local limit, used, reserved = c[unit[2]], c[unit[3]], c[unit[4]]
      if limit ~= LIMIT_NONE and limit > 0 then
        for _, bp in ipairs(notify_fractions) do
          if used + reserved >= threshold(limit, bp) and used + reserved > 0
            and redis.call('HSETNX', win_keys[i], 'notified:' .. unit[1] .. ':' .. bp, now) == 1 then
            notify_append(prefix, notify, { 'type', 'window.crossed', 'time', string.format('%d', now),
              'window', string.match(win_keys[i], ':win:(.*)$') or '', 'unit', unit[1], 'fraction_bp', bp,
              'limit', string.format('%d', limit), 'used', string.format('%d', used),
              'reserved', string.format('%d', reserved) })
          end
        end
      end
    end
  end
end
return out
