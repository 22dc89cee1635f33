-- Report: replace a reservation by the real usage of its step, exactly once per idempotency key.
--
-- KEYS[1] reservation record   KEYS[2] tenant leases
-- KEYS[3] idempotency marker; for a record without a key, the marker's base, completed here with the reservation's
--         generation so that each reservation of a step takes one keyless report
-- KEYS[4] the tenant's usage event stream
-- KEYS[5..] where to charge usage that has no reservation: the task (if known) then the tenant's current windows
-- ARGV[1] now (ms)   ARGV[2] idempotency window (ms)   ARGV[3] tokens used   ARGV[4] cost (micro-USD)
-- ARGV[5] reservation key prefix   ARGV[6] 1 if KEYS[5] is the task   ARGV[7] task retention (ms)
-- ARGV[8] task id   ARGV[9] task type   ARGV[10] 1 if the record has no idempotency key
-- ARGV[11] the usage event (JSON, from the caller)   ARGV[12] event id ('' without a key: derived here)
-- ARGV[13] stream length cap   ARGV[14] oldest stream entry to keep (ms)
-- then per fallback key: alive-until (ms; 0 for the task)
--
-- Every applied record (not a duplicate) is appended to the stream in this same script, so counters and billing
-- events never disagree.
--
-- Returns { status, charged tokens, charged micro-USD, refunded tokens, overage tokens, task known (0/1),
--           then the task's limit, used, reserved, limit_usd, used_usd, reserved_usd, then the task type }
-- status: 1 applied to its reservation, 2 duplicate, 3 charged without a (live) reservation.

local resv_key, leases, marker, stream = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now, tokens, usd = tonumber(ARGV[1]), tonumber(ARGV[3]), tonumber(ARGV[4])
local UNTILS, FIRST_FALLBACK = 14, 5

local generation = num(redis.call('HGET', resv_key, 'gen'))
if ARGV[10] == '1' then marker = marker .. ':' .. generation end
if not redis.call('SET', marker, '1', 'NX', 'PX', ARGV[2]) then
  return { 2, 0, 0, 0, 0, 0, LIMIT_NONE, 0, 0, LIMIT_NONE, 0, 0, ARGV[9] }
end

purge_expired(leases, ARGV[5], now)

local status, refunded, overage = 3, 0, 0
local task_key = nil
local admitted = 'NONE'
local record = load_record(resv_key)
if record then
  admitted = redis.call('HGET', resv_key, 'admitted') or 'NONE'
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
    task_key = KEYS[FIRST_FALLBACK]
    if redis.call('EXISTS', task_key) == 0 then
      redis.call('HSET', task_key, 'task_id', ARGV[8], 'task_type', ARGV[9])
    end
    redis.call('PEXPIRE', task_key, ARGV[7])
  end
  for i = FIRST_FALLBACK, #KEYS do
    local alive_until = tonumber(ARGV[UNTILS + i - FIRST_FALLBACK + 1])
    if scope_alive(KEYS[i], alive_until, now) then
      redis.call('HINCRBY', KEYS[i], 'used', tokens)
      redis.call('HINCRBY', KEYS[i], 'used_usd', usd)
      -- A window key first touched by a report must expire too.
      if alive_until > 0 then redis.call('PEXPIRE', KEYS[i], alive_until - now) end
    end
  end
end

local task_type = ARGV[9]
if task_key then task_type = redis.call('HGET', task_key, 'task_type') or task_type end
local event_id = ARGV[12]
if event_id == '' then event_id = string.match(resv_key, '([^:]+)$') .. '-' .. generation end
local statuses = { 'applied', 'duplicate', 'unreserved' }
redis.call('XADD', stream, 'MAXLEN', '~', ARGV[13], '*', 'id', event_id, 'status', statuses[status],
  'admitted', admitted, 'task_type', task_type, 'event', ARGV[11])
redis.call('XTRIM', stream, 'MINID', '~', ARGV[14])

local out = { status, tokens, usd, refunded, overage, 0 }
if task_key and redis.call('EXISTS', task_key) == 1 then
  out[6] = 1
  append_counter(out, task_counter(task_key))
else
  append_counter(out, { LIMIT_NONE, 0, 0, LIMIT_NONE, 0, 0 })
end
out[#out + 1] = task_type
return out
