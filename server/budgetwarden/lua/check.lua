-- Check: reserve the first candidate amount that fits every scope, on all of them at once, or reserve nothing.
--
-- KEYS[1] reservation record   KEYS[2] tenant leases   KEYS[3] task   KEYS[4..] tenant windows, in plan order
-- ARGV[1] now (ms)   ARGV[2] lease expiry (ms)   ARGV[3] record retention after the lease (ms)
-- ARGV[4] reservation key prefix   ARGV[5] task retention (ms)   ARGV[6] ceiling for a new task (-1: none)
-- ARGV[7] task id   ARGV[8] task type   ARGV[9] step id   ARGV[10] amount requested
-- then per window: limit (-1: none), alive-until (ms); then the number of candidates and the candidates.
--
-- Returns { status, fitted (0-based, -1: none), granted, lease expiry, then limit, used, reserved per scope }.
-- status: 1 reserved now, 2 replay of an earlier reservation of this step, 0 nothing reserved.

local resv_key, leases, task_key = KEYS[1], KEYS[2], KEYS[3]
local now = tonumber(ARGV[1])
local lease_until = tonumber(ARGV[2])
local nwin = #KEYS - 3

purge_expired(leases, ARGV[4], now)

local function counters(out)
  local limit, used, reserved = task_counter(task_key)
  out[#out + 1] = limit; out[#out + 1] = used; out[#out + 1] = reserved
  for i = 1, nwin do
    local f = redis.call('HMGET', KEYS[3 + i], 'used', 'reserved')
    out[#out + 1] = tonumber(ARGV[10 + 2 * i - 1]); out[#out + 1] = num(f[1]); out[#out + 1] = num(f[2])
  end
  return out
end

-- The same step checked again gets the same reservation while it is held or after it was reported. A released or
-- lapsed one holds nothing any more, so the step may reserve again.
local existing = redis.call('HMGET', resv_key, 'state', 'amount', 'lease')
if existing[1] == 'reserved' or existing[1] == 'reported' then
  return counters({ 2, 0, num(existing[2]), num(existing[3]) })
end

-- The first check fixes the task's ceiling. Usage reported before it (without a reservation) stays counted.
if redis.call('HSETNX', task_key, 'limit', ARGV[6]) == 1 then
  redis.call('HSET', task_key, 'task_id', ARGV[7], 'task_type', ARGV[8])
end
redis.call('PEXPIRE', task_key, ARGV[5])

local limits, held = {}, {}
local task_limit, task_used, task_reserved = task_counter(task_key)
limits[1], held[1] = task_limit, task_used + task_reserved
for i = 1, nwin do
  local f = redis.call('HMGET', KEYS[3 + i], 'used', 'reserved')
  limits[i + 1], held[i + 1] = tonumber(ARGV[10 + 2 * i - 1]), num(f[1]) + num(f[2])
end

local first = 10 + 2 * nwin + 1
local ncand = tonumber(ARGV[first])
for c = 1, ncand do
  local amount = tonumber(ARGV[first + c])
  local fits = true
  for s = 1, nwin + 1 do
    if limits[s] ~= LIMIT_NONE and held[s] + amount > limits[s] then fits = false; break end
  end
  if fits then
    local scopes, untils = { task_key }, { '0' }
    redis.call('HINCRBY', task_key, 'reserved', amount)
    redis.call('HINCRBY', task_key, 'active', 1)
    for i = 1, nwin do
      local key, alive_until = KEYS[3 + i], ARGV[10 + 2 * i]
      redis.call('HINCRBY', key, 'reserved', amount)
      redis.call('PEXPIRE', key, math.max(1, tonumber(alive_until) - now))
      scopes[#scopes + 1], untils[#untils + 1] = key, alive_until
    end
    -- A step reserved again (after a release or a lapse) starts a new generation: its keyless report counts anew.
    local generation = num(redis.call('HGET', resv_key, 'gen')) + 1
    redis.call('DEL', resv_key)
    redis.call('HSET', resv_key, 'state', 'reserved', 'gen', generation, 'amount', amount, 'lease', lease_until,
      'scopes', table.concat(scopes, ' '), 'untils', table.concat(untils, ' '),
      'requested', ARGV[10], 'step_id', ARGV[9])
    redis.call('PEXPIRE', resv_key, math.max(1, lease_until - now) + tonumber(ARGV[3]))
    redis.call('ZADD', leases, lease_until, string.match(resv_key, '([^:]+)$'))
    return counters({ 1, c - 1, amount, lease_until })
  end
end
return counters({ 0, -1, 0, 0 })
