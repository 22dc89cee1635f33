-- Report: for each usage record of a batch of one tenant, in order, replace a reservation by the real usage of its
-- step, exactly once per idempotency key. Each record is applied exactly as if it ran alone after the records before
-- it in the batch; a unary report of one record is a batch of one.
--
-- KEYS[1] tenant leases   KEYS[2] the tenant's usage event stream
-- KEYS[3 .. 2+nwin] the tenant windows the batch's records fall in (each record names its own, by position)
-- then per record: KEYS reservation record, idempotency marker (for a record without a key, the marker's base,
--   completed here with the reservation's generation so that each reservation of a step takes one keyless report),
--   the task (the reservation record again when the record names no task: a placeholder in the tenant's hash slot)
-- ARGV[1] now (ms)   ARGV[2] idempotency window (ms)   ARGV[3] reservation key prefix   ARGV[4] task retention (ms)
-- ARGV[5] stream length cap   ARGV[6] oldest stream entry to keep (ms)   ARGV[7] number of windows (nwin)
-- then per window: alive-until (ms)
-- then per record one argument, its fields joined by \31 (the unit separator: ids never hold control characters,
-- and JSON escapes them):
--   tokens used, cost (micro-USD), 1 if the record names a task, 1 if it has no idempotency key, task id, task type,
--   event id ('' without a key: derived here), the record's windows (their 1-based positions among the batch's
--   windows, space-separated), the usage event (JSON, from the caller), the record's fingerprint, 1 if the record
--   names a model, then its uncached input, cached input and output tokens
-- Times, amounts and counts are whole numbers from 0 to 2^53.
--
-- A record naming no model is priced here at the prices its reservation recorded (the model the step was checked
-- for); without a reservation that recorded prices, at the cost from the caller (the policy's default model).
--
-- An idempotency marker holds the fingerprint of the record that used it: the same key with the same record is a
-- duplicate; with another record it is a conflict. Every record of the call is checked for a conflict before anything
-- is written, and a conflict is the error reply 'BWCONFLICT <0-based record index>': nothing of the call is applied.
--
-- Usage without a (live) reservation is charged to the task (if known) and to the record's windows.
-- Every applied record (not a duplicate) is appended to the stream in this same script, so counters and billing
-- events never disagree.
--
-- Returns one reply per record, in order:
--   { status, charged tokens, charged micro-USD, refunded tokens, overage tokens, task known (0/1),
--     then the task's limit, used, reserved, limit_usd, used_usd, reserved_usd, then the task type,
--     late (1: the record's reservation had lapsed before it was reported), priced from the reservation (0/1),
--     and the model it was priced at (URL-quoted, as the reservation recorded it; '' when not priced here) }
-- status: 1 applied to its reservation, 2 duplicate, 3 charged without a (live) reservation.
-- A malformed argument or a wrong number of keys is an error reply, before anything is written.

local leases, stream = KEYS[1], KEYS[2]
for i = 1, 7 do
  if i ~= 3 and not whole(ARGV[i]) then return redis.error_reply('report argument ARGV[' .. i .. '] is malformed') end
end
local now = tonumber(ARGV[1])
local nwin = tonumber(ARGV[7])
local first_record = 8 + nwin
local FIELDS = 14
for i = 1, nwin do
  if not whole(ARGV[7 + i]) or tonumber(ARGV[7 + i]) == 0 then
    return redis.error_reply('report window ' .. i .. ' has a malformed alive-until')
  end
end

-- Every record's argument is parsed and checked before anything is written: a script is not rolled back.
local records = {}
for n = first_record, #ARGV do
  local f = fields(ARGV[n])
  if #f ~= FIELDS or not (whole(f[1]) and whole(f[2]) and whole(f[12]) and whole(f[13]) and whole(f[14])) then
    return redis.error_reply('report argument ' .. (n - first_record) .. ' is malformed')
  end
  local positions = {}
  for word in string.gmatch(f[8], '%S+') do
    local i = tonumber(word)
    if not whole(word) or i < 1 or i > nwin then
      return redis.error_reply('report argument ' .. (n - first_record) .. ' names an unknown window')
    end
    positions[#positions + 1] = i
  end
  records[#records + 1] = { tokens = tonumber(f[1]), usd = tonumber(f[2]), has_task = f[3] == '1',
    keyless = f[4] == '1', task_id = f[5], task_type = f[6], event_id = f[7], windows = positions, event = f[9],
    fingerprint = f[10], has_model = f[11] == '1',
    amounts = { tonumber(f[12]), tonumber(f[13]), tonumber(f[14]) } }
end
if #KEYS ~= 2 + nwin + 3 * #records then
  return redis.error_reply('expected ' .. (2 + nwin + 3 * #records) .. ' keys, got ' .. #KEYS)
end

-- The idempotency marker of each record (a keyless one's is completed with its reservation's generation, which only a
-- check changes), and a conflict check of all of them before anything is written: a refused call applies nothing.
-- A marker written before fingerprints were stored holds '1' and matches any record.
local claimed = {}
for n = 1, #records do
  local at = 2 + nwin + 3 * (n - 1)
  local r = records[n]
  r.marker = KEYS[at + 2]
  if r.keyless then r.marker = r.marker .. ':' .. num(redis.call('HGET', KEYS[at + 1], 'gen')) end
  local holder = claimed[r.marker]
  if holder == nil then
    holder = redis.call('GET', r.marker) or r.fingerprint
    claimed[r.marker] = holder
  end
  if holder ~= '1' and holder ~= r.fingerprint then return redis.error_reply('BWCONFLICT ' .. (n - 1)) end
end

purge_expired(leases, ARGV[3], now, batch_sweep(#records))

local STATUSES = { 'applied', 'duplicate', 'unreserved' }
local NO_TASK = { LIMIT_NONE, 0, 0, LIMIT_NONE, 0, 0 }

-- The cost of a record naming no model, at the prices its reservation recorded; nil when it recorded none.
local function reservation_price(resv_key, r)
  local f = redis.call('HMGET', resv_key, 'model', 'price_in', 'price_cached', 'price_out')
  if not (f[2] and whole(f[2]) and whole(f[3]) and whole(f[4])) then return nil end
  return cost_micros(r.amounts, { tonumber(f[2]), tonumber(f[3]), tonumber(f[4]) }), f[1] or ''
end

local function report(resv_key, task_key, r)
  local tokens, usd = r.tokens, r.usd
  local generation = num(redis.call('HGET', resv_key, 'gen'))
  if not redis.call('SET', r.marker, r.fingerprint, 'NX', 'PX', ARGV[2]) then
    local out = { 2, 0, 0, 0, 0, 0 }
    append_counter(out, NO_TASK)
    out[#out + 1] = r.task_type
    out[#out + 1] = 0
    out[#out + 1] = 0
    out[#out + 1] = ''
    return out
  end

  local status, refunded, overage, late = 3, 0, 0, 0
  local priced, model = 0, ''
  local admitted = 'NONE'
  local record = load_record(resv_key)
  if record then
    if not r.has_model then
      local cost, recorded = reservation_price(resv_key, r)
      if cost then usd, priced, model = cost, 1, recorded end
    end
    admitted = redis.call('HGET', resv_key, 'admitted') or 'NONE'
    task_key = words(record.scopes)[1]
    if record.state == 'reserved' and record.lease <= now then
      end_hold(resv_key, record, 'expired', leases, now)
      record.state = 'expired'
    end
    -- Usage of a reservation whose lease lapsed first: the budget it held was free for other steps meanwhile.
    if record.state == 'expired' then late = 1 end
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
    if r.has_task then
      if redis.call('EXISTS', task_key) == 0 then
        redis.call('HSET', task_key, 'task_id', r.task_id, 'task_type', r.task_type)
      end
      redis.call('PEXPIRE', task_key, ARGV[4])
      redis.call('HINCRBY', task_key, 'used', tokens)
      redis.call('HINCRBY', task_key, 'used_usd', usd)
    else
      task_key = nil
    end
    for _, i in ipairs(r.windows) do
      local key, alive_until = KEYS[2 + i], tonumber(ARGV[7 + i])
      if scope_alive(key, alive_until, now) then
        redis.call('HINCRBY', key, 'used', tokens)
        redis.call('HINCRBY', key, 'used_usd', usd)
        -- A window key first touched by a report must expire too.
        redis.call('PEXPIRE', key, alive_until - now)
      end
    end
  end

  local task_type = r.task_type
  if task_key then task_type = redis.call('HGET', task_key, 'task_type') or task_type end
  local event_id = r.event_id
  if event_id == '' then event_id = string.match(resv_key, '([^:]+)$') .. '-' .. generation end
  local entry = { 'id', event_id, 'status', STATUSES[status], 'admitted', admitted, 'task_type', task_type,
    'event', r.event }
  -- Priced here: the event's model and cost (from the caller) give way to these.
  if priced == 1 then
    for _, v in ipairs({ 'model', model, 'cost_usd_micros', usd }) do entry[#entry + 1] = v end
  end
  redis.call('XADD', stream, 'MAXLEN', '~', ARGV[5], '*', unpack(entry))

  local out = { status, tokens, usd, refunded, overage, 0 }
  if task_key and redis.call('EXISTS', task_key) == 1 then
    out[6] = 1
    append_counter(out, task_counter(task_key))
  else
    append_counter(out, NO_TASK)
  end
  out[#out + 1] = task_type
  out[#out + 1] = late
  out[#out + 1] = priced
  out[#out + 1] = model
  return out
end

local out = {}
for n = 1, #records do
  local at = 2 + nwin + 3 * (n - 1)
  out[n] = report(KEYS[at + 1], KEYS[at + 3], records[n])
end
redis.call('XTRIM', stream, 'MINID', '~', ARGV[6])
return out
