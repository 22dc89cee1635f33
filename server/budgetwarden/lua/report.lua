-- Report: replace a reservation by the real usage of its step, exactly once per idempotency key.
--
-- KEYS[1] reservation record   KEYS[2] tenant leases
-- KEYS[3] idempotency marker; for a record without a key, the marker's base, completed here with the reservation's
--         generation so that each reservation of a step takes one keyless report
-- KEYS[4..] where to charge usage that has no reservation: the task (if known) then the tenant's current windows
-- ARGV[1] now (ms)   ARGV[2] idempotency window (ms)   ARGV[3] tokens used   ARGV[4] reservation key prefix
-- ARGV[5] 1 if KEYS[4] is the task   ARGV[6] task retention (ms)   ARGV[7] task id   ARGV[8] task type
-- ARGV[9] 1 if the record has no idempotency key   then per fallback key: alive-until (ms; 0 for the task)
--
-- Returns { status, charged, refunded, overage, task known (0/1), task limit, task used, task reserved }
-- status: 1 applied to its reservation, 2 duplicate, 3 charged without a (live) reservation.

local resv_key, leases, marker = KEYS[1], KEYS[2], KEYS[3]
local now, tokens = tonumber(ARGV[1]), tonumber(ARGV[3])

if ARGV[9] == '1' then marker = marker .. ':' .. num(redis.call('HGET', resv_key, 'gen')) end
if not redis.call('SET', marker, '1', 'NX', 'PX', ARGV[2]) then
  return { 2, 0, 0, 0, 0, LIMIT_NONE, 0, 0 }
end

purge_expired(leases, ARGV[4], now)

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
  add_to_scopes(record, 'used', tokens, now)
else
  local has_task = ARGV[5] == '1'
  if has_task then
    task_key = KEYS[4]
    if redis.call('EXISTS', task_key) == 0 then
      redis.call('HSET', task_key, 'task_id', ARGV[7], 'task_type', ARGV[8], 'used', 0, 'reserved', 0, 'active', 0)
    end
    redis.call('PEXPIRE', task_key, ARGV[6])
  end
  for i = 4, #KEYS do
    if scope_alive(KEYS[i], tonumber(ARGV[9 + i - 3]), now) then redis.call('HINCRBY', KEYS[i], 'used', tokens) end
  end
  -- A window key first touched by a report must expire too.
  for i = 4, #KEYS do
    local alive_until = tonumber(ARGV[9 + i - 3])
    if alive_until > now then redis.call('PEXPIRE', KEYS[i], alive_until - now) end
  end
end

local known, limit, used, reserved = 0, LIMIT_NONE, 0, 0
if task_key and redis.call('EXISTS', task_key) == 1 then
  known = 1
  limit, used, reserved = task_counter(task_key)
end
return { status, tokens, refunded, overage, known, limit, used, reserved }
