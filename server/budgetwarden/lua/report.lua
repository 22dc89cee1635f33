-- Report: replace a reservation by the real usage of its step, exactly once per idempotency key.
--
-- KEYS[1] reservation record   KEYS[2] tenant leases
-- KEYS[3] idempotency marker; for a record without a key, the marker's base, completed here with the reservation's
--         generation so that each reservation of a step takes one keyless report
-- KEYS[4..] where to charge usage that has no reservation: the task (if known) then the tenant's current windows
-- ARGV[1] now (ms)   ARGV[2] idempotency window (ms)   ARGV[3] tokens used   ARGV[4] cost (micro-USD)
-- ARGV[5] reservation key prefix   ARGV[6] 1 if KEYS[4] is the task   ARGV[7] task retention (ms)
-- ARGV[8] task id   ARGV[9] task type   ARGV[10] 1 if the record has no idempotency key
-- then per fallback key: alive-until (ms; 0 for the task)
--
-- Returns { status, charged tokens, charged micro-USD, refunded tokens, overage tokens, task known (0/1),
--           then the task's limit, used, reserved, limit_usd, used_usd, reserved_usd }
-- status: 1 applied to its reservation, 2 duplicate, 3 charged without a (live) reservation.

local resv_key, leases, marker = KEYS[1], KEYS[2], KEYS[3]
local now, tokens, usd = tonumber(ARGV[1]), tonumber(ARGV[3]), tonumber(ARGV[4])
local UNTILS = 10

if ARGV[10] == '1' then marker = marker .. ':' .. num(redis.call('HGET', resv_key, 'gen')) end
if not redis.call('SET', marker, '1', 'NX', 'PX', ARGV[2]) then
  return { 2, 0, 0, 0, 0, 0, LIMIT_NONE, 0, 0, LIMIT_NONE, 0, 0 }
end

purge_expired(leases, ARGV[5], now)

local status, refunded, overage = 3, 0, 0
local task_key = nil
local record = load_record(resv_key)
if record then
  task_key = words(record.scopes)[1]
  if record.state == 'reserved' and record.lease <= now then
    end_hold(resv_key, record, 'expired', leases, now)
    record.state = 'expired'
  end
  if record.state == 'reserved' then
    end_hold(resv_key, record, 'reported', leases, now)
    status = 1
    if tokens < record.amount then refunded = record.amount - tokens else overage = tokens - record.amount end
  else
    -- The step ran after all (late, or after a release): checking it again replays instead of reserving anew.
    redis.call('HSET', resv_key, 'state', 'reported')
  end
  -- Real spend is never dropped: charged to the scopes the step was admitted on, reserved or not.
  add_to_scopes(record, 'used', tokens, usd, now)
else
  if ARGV[6] == '1' then
    task_key = KEYS[4]
    if redis.call('EXISTS', task_key) == 0 then
      redis.call('HSET', task_key, 'task_id', ARGV[8], 'task_type', ARGV[9])
    end
    redis.call('PEXPIRE', task_key, ARGV[7])
  end
  for i = 4, #KEYS do
    local alive_until = tonumber(ARGV[UNTILS + i - 3])
    if scope_alive(KEYS[i], alive_until, now) then
      redis.call('HINCRBY', KEYS[i], 'used', tokens)
      redis.call('HINCRBY', KEYS[i], 'used_usd', usd)
      -- A window key first touched by a report must expire too.
      if alive_until > 0 then redis.call('PEXPIRE', KEYS[i], alive_until - now) end
    end
  end
end

local out = { status, tokens, usd, refunded, overage, 0 }
if task_key and redis.call('EXISTS', task_key) == 1 then
  out[6] = 1
  append_counter(out, task_counter(task_key))
else
  append_counter(out, { LIMIT_NONE, 0, 0, LIMIT_NONE, 0, 0 })
end
return out
