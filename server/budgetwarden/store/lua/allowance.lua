-- Allowance: a sidecar's slice of a task's budget, reserved in one atomic call, decided from locally, settled here.
-- (docs/local-allowance.md)
--
-- A slice is a reservation record like a step's (<p>resv:<slice id>, 'kind' = 'slice'), so it is counted as reserved
-- on the task and on the tenant's windows, it has a lease in the tenant's lease set, and every script's sweep
-- (purge_expired) hands back the slice of a holder that died when its lease lapses. Steps granted from the slice are
-- moved out of it into reservation records of their own when the holder settles: the task's and windows' 'reserved'
-- do not change then (the tokens were reserved already, as part of the slice).
--
-- KEYS[1] tenant leases   KEYS[2] the slice's record   KEYS[3] the task   KEYS[4 ..] (take only) the tenant windows
-- ARGV[1] 'take' or 'settle'   ARGV[2] now (ms)   ARGV[3] reservation key prefix   ARGV[4] record retention after the
--   lease (ms)   ARGV[5] the slice's lease expiry (ms): a take's, or a settle's renewal
--
-- take: ARGV[6] cap in tokens, ARGV[7] cap in micro-USD (-1: none), ARGV[8] the share of what is left to take
--   (basis points), ARGV[9] tokens wanted at least, ARGV[10] micro-USD wanted at least, then per window: token limit,
--   micro-USD limit (-1: none), alive-until (ms). Each take has a record of its own (a live one of the same id is
--   handed back first, so that no id ever holds two slices).
--   The token slice is min(cap, share of what is left), where what is left is the least room over the task (up to its
--   lowest line: soft threshold, else checkpoint threshold, else ceiling) and every window; the cost slice is
--   min(cost cap, the same proportion of the cost room as the token slice is of the token room). A unit no scope
--   limits is not sliced (-1): grants in it are counted when settled.
--   Returns { status, tokens, micro-USD (-1: unlimited), lease, soft bp, checkpoint bp, then per scope (task, then
--   windows): limit, used, reserved, limit_usd, used_usd, reserved_usd (after the take) }
--   status: 1 taken; nothing taken: 0 the task has had no check yet (its first check fixes its ceiling), 2 the task
--   is closed or at a checkpoint, or less than wanted is left
--
-- settle: ARGV[6] 1 to hand back the rest and end the slice, 0 to keep it (its lease becomes ARGV[5]), then per step
--   granted from the slice one argument, its fields joined by \31: lease expiry (ms), step id, tokens, micro-USD,
--   fingerprint, answer, label (as check.lua keeps them); KEYS[4 ..] per step its reservation record and the base
--   of its keyless report marker (report.lua), in order.
--   Returns { slice status, tokens handed back, then per step: 1 recorded, 2 the step already held a reservation
--   with the same fingerprint (the grant is a replay: its tokens go back), 5 the same with another fingerprint (a
--   conflict: its tokens go back), 4 the step was reported (without a key) before it was settled, through another
--   sidecar: the report charged it as usage without a reservation, so nothing is reserved for it and its tokens leave
--   the slice (no longer reserved: the report spent them), 3 the slice had lapsed (recorded as lapsed: a report of it is late, as for a step whose own lease lapsed) }
--   slice status: 1 live, 0 it had lapsed or was handed back before.
-- A malformed argument is an error reply, before anything is written.

local leases, slice_key, task_key = KEYS[1], KEYS[2], KEYS[3]
local op, now, prefix, retention = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local lease_until = tonumber(ARGV[5])
if not (whole(ARGV[2]) and whole(ARGV[4]) and whole(ARGV[5])) then
  return redis.error_reply('allowance argument is malformed')
end

local function slice_id() return string.match(slice_key, '([^:]+)$') end

-- Room under a line (-1: no line), never below zero.
local function room(line, held)
  if line == LIMIT_NONE then return LIMIT_NONE end
  return math.max(0, line - held)
end

local function least(a, b)
  if a == LIMIT_NONE then return b end
  if b == LIMIT_NONE then return a end
  return math.min(a, b)
end

-- min(cap, share of what is left); -1 when neither the cap nor any scope limits the unit.
local function slice_of(left, cap, share_bp)
  if left == LIMIT_NONE then return cap end
  local share = threshold(left, share_bp)
  if cap == LIMIT_NONE then return share end
  return math.min(cap, share)
end

local function take()
  local nwin = #KEYS - 3
  if #ARGV ~= 10 + 3 * nwin then return redis.error_reply('expected ' .. (10 + 3 * nwin) .. ' arguments') end
  for i = 6, #ARGV do
    if i ~= 7 and not (whole(ARGV[i]) or ARGV[i] == '-1') then
      return redis.error_reply('allowance argument ARGV[' .. i .. '] is malformed')
    end
  end
  purge_expired(leases, prefix, now)
  local held = load_record(slice_key)
  if held and held.state == 'reserved' then end_hold(slice_key, held, 'released', leases, now) end

  local f = redis.call('HMGET', task_key, 'init', 'closed', 'checkpoint', 'soft_bp', 'ckpt_bp')
  local soft_bp, ckpt_bp = tonumber(f[4] or LIMIT_NONE), tonumber(f[5] or LIMIT_NONE)
  local task = task_counter(task_key)
  local windows = {}
  for i = 1, nwin do
    local at = 11 + 3 * (i - 1)
    windows[i] = window_counter(KEYS[3 + i], ARGV[at], ARGV[at + 1])
  end
  local function answer(status, tokens, usd)
    local out = { status, tokens, usd, lease_until, soft_bp, ckpt_bp }
    append_counter(out, task)
    for i = 1, nwin do append_counter(out, windows[i]) end
    return out
  end
  if not f[1] then return answer(0, 0, 0) end
  if f[2] == '1' or f[3] then return answer(2, 0, 0) end

  -- The task's lowest line: local grants are steps as asked, which stay under the soft threshold when one is set.
  local line_bp = ckpt_bp
  if soft_bp ~= LIMIT_NONE then line_bp = soft_bp end
  local left = room(threshold(task[1], line_bp), task[2] + task[3])
  local left_usd = room(threshold(task[4], line_bp), task[5] + task[6])
  for i = 1, nwin do
    local c = windows[i]
    left = least(left, room(c[1], c[2] + c[3]))
    left_usd = least(left_usd, room(c[4], c[5] + c[6]))
  end
  local cap, cap_usd, share_bp = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
  local tokens = slice_of(left, cap, share_bp)
  -- Cost is sliced in the same proportion as tokens (the token cap binding makes the cost slice smaller too), so that
  -- a slice never holds much more of one unit's room than of the other's.
  local usd_bp = share_bp
  if left ~= LIMIT_NONE then usd_bp = left > 0 and math.min(10000, math.floor(tokens / left * 10000)) or 0 end
  local usd = LIMIT_NONE
  if left_usd ~= LIMIT_NONE then usd = slice_of(left_usd, cap_usd, usd_bp) end
  if tokens < tonumber(ARGV[9]) or (usd ~= LIMIT_NONE and usd < tonumber(ARGV[10])) then return answer(2, 0, 0) end

  local counted_usd = math.max(0, usd)
  local scopes, untils = task_key, '0'
  redis.call('HINCRBY', task_key, 'reserved', tokens)
  if counted_usd > 0 then redis.call('HINCRBY', task_key, 'reserved_usd', counted_usd) end
  redis.call('HINCRBY', task_key, 'active', 1)
  task[3], task[6] = task[3] + tokens, task[6] + counted_usd
  for i = 1, nwin do
    local key, alive_until = KEYS[3 + i], ARGV[13 + 3 * (i - 1)]
    redis.call('HINCRBY', key, 'reserved', tokens)
    if counted_usd > 0 then redis.call('HINCRBY', key, 'reserved_usd', counted_usd) end
    redis.call('PEXPIRE', key, math.max(1, tonumber(alive_until) - now))
    windows[i][3], windows[i][6] = windows[i][3] + tokens, windows[i][6] + counted_usd
    scopes, untils = scopes .. ' ' .. key, untils .. ' ' .. alive_until
  end
  redis.call('DEL', slice_key)
  redis.call('HSET', slice_key, 'kind', 'slice', 'state', 'reserved', 'amount', tokens, 'amount_usd', counted_usd,
    'usd_free', usd == LIMIT_NONE and 1 or 0, 'lease', lease_until, 'scopes', scopes, 'untils', untils)
  redis.call('PEXPIRE', slice_key, math.max(1, lease_until - now) + tonumber(retention))
  redis.call('ZADD', leases, lease_until, slice_id())
  return answer(1, tokens, usd)
end

local function settle()
  local give_back = ARGV[6] == '1'
  local steps = {}
  for n = 7, #ARGV do
    local g = fields(ARGV[n])
    if #g ~= 7 or not (whole(g[1]) and whole(g[3]) and whole(g[4])) then
      return redis.error_reply('allowance step ' .. (n - 7) .. ' is malformed')
    end
    steps[#steps + 1] = g
  end
  if #KEYS ~= 3 + 2 * #steps then
    return redis.error_reply('expected ' .. (3 + 2 * #steps) .. ' keys, got ' .. #KEYS)
  end

  -- The sweep may end the slice here: then its steps' leases (never longer than the slice's) had lapsed too.
  purge_expired(leases, prefix, now)
  local slice = load_record(slice_key)
  local live = slice ~= nil and slice.state == 'reserved'
  local usd_free = live and redis.call('HGET', slice_key, 'usd_free') == '1'
  local out = { live and 1 or 0, 0 }
  local taken, taken_usd = 0, 0
  for n, g in ipairs(steps) do
    local tokens, usd = tonumber(g[3]), tonumber(g[4])
    taken, taken_usd = taken + tokens, taken_usd + (usd_free and 0 or usd)
  end
  if live and (taken > slice.amount or taken_usd > slice.amount_usd) then
    return redis.error_reply('the steps take more than the slice holds')
  end

  for n, g in ipairs(steps) do
    local resv_key, marker = KEYS[2 + 2 * n], KEYS[3 + 2 * n]
    local tokens, usd = tonumber(g[3]), tonumber(g[4])
    local existing = redis.call('HMGET', resv_key, 'state', 'gen', 'fp')
    local reported_first = not (existing[1] == 'reserved' or existing[1] == 'reported')
      and redis.call('EXISTS', marker .. ':' .. num(existing[2])) == 1
    if reported_first then
      -- Already charged by a report that found no reservation: the grant was spent. Its tokens leave the slice and stop
      -- counting as reserved, as a reservation's do when its report comes; kept in the slice, they would be granted
      -- again on top of the usage the report charged.
      out[#out + 1] = 4
      if live then add_to_scopes(slice, 'reserved', -tokens, usd_free and 0 or -usd, now) end
    elseif existing[1] == 'reserved' or existing[1] == 'reported' then
      -- Granted here and there: what the store has stands, this grant's tokens stay in the slice (handed back with
      -- its rest).
      out[#out + 1] = (existing[3] and existing[3] ~= g[5]) and 5 or 2
      taken = taken - tokens
      if not usd_free then taken_usd = taken_usd - usd end
    else
      local state = live and 'reserved' or 'expired'
      local admitted, model, p_in, p_cached, p_out = candidate_label(g[7])
      if existing[1] then redis.call('DEL', resv_key) end
      redis.call('HSET', resv_key, 'state', state, 'gen', num(existing[2]) + 1, 'amount', tokens, 'amount_usd', usd,
        'lease', g[1], 'scopes', slice and slice.scopes or task_key, 'untils', slice and slice.untils or '0',
        'step_id', g[2], 'admitted', admitted, 'model', model, 'price_in', p_in, 'price_cached', p_cached,
        'price_out', p_out, 'fp', g[5], 'answer', g[6])
      redis.call('PEXPIRE', resv_key, math.max(1, tonumber(g[1]) - now) + tonumber(retention))
      if live then
        redis.call('ZADD', leases, g[1], string.match(resv_key, '([^:]+)$'))
        redis.call('HINCRBY', task_key, 'active', 1)
        -- A unit the slice does not count is counted now, on the step's own reservation.
        if usd_free and usd ~= 0 then add_to_scopes(slice, 'reserved', 0, usd, now) end
      end
      out[#out + 1] = live and 1 or 3
    end
  end
  if not live then return out end

  slice.amount, slice.amount_usd = slice.amount - taken, slice.amount_usd - taken_usd
  redis.call('HSET', slice_key, 'amount', slice.amount, 'amount_usd', slice.amount_usd)
  if give_back then
    out[2] = end_hold(slice_key, slice, 'released', leases, now)
  else
    redis.call('HSET', slice_key, 'lease', lease_until)
    redis.call('PEXPIRE', slice_key, math.max(1, lease_until - now) + tonumber(retention))
    redis.call('ZADD', leases, lease_until, slice_id())
  end
  return out
end

if op == 'take' then return take() end
if op == 'settle' then return settle() end
return redis.error_reply('allowance operation must be take or settle')
