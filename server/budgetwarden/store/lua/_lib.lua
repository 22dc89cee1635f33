-- Helpers shared by every budgetwarden script; the store prepends this file to each script before loading it.
--
-- Data model (all keys of one tenant share the hash tag {tenant}, so every script runs on Redis Cluster):
--   <p>task:<h>      hash  limit, limit_usd, soft_bp, ckpt_bp, used, reserved, used_usd, reserved_usd, active,
--                         checkpoint (open id), checkpoint_at, checkpoints (count), closed, task_id, task_type
--                                                                               (expires after task retention)
--   <p>win:<w>:<l>   hash  used, reserved, used_usd, reserved_usd                (expires after its window + grace)
--   <p>resv:<id>     hash  state, gen, amount, amount_usd, lease, scopes, untils (expires after lease + retention)
--                         step_id, admitted (ALLOW or DEGRADE:rung), model, price_in, price_cached, price_out (the
--                         model the step was granted and its prices per million tokens, for a report naming none),
--                         fp (the request's fingerprint) and answer (what the check answered: a re-check with the
--                         same fingerprint replays it; see check.lua)
--   <p>idem:<h>      string  the fingerprint of the record that used an idempotency key (expires after its window)
--   <p>leases        zset  reservation id -> lease expiry (ms); expired members are purged lazily by every script
-- A reservation names the scope keys it holds on ("scopes") and until when each scope key is alive ("untils";
-- 0 means the task key, which is alive as long as it exists). Scope keys read from a reservation are in the same hash
-- slot as the script's declared keys, because they carry the same tenant tag.
-- Times come from the caller's clock (ARGV); expiries are set relative to it (PEXPIRE, never PEXPIREAT), so a skew
-- between the sidecar's clock and Redis's never makes a key vanish early.

local LIMIT_NONE = -1
local PURGE_BATCH = 256

local function num(value)
  if value == false or value == nil then return 0 end
  return tonumber(value)
end

local function words(text)
  local out = {}
  for word in string.gmatch(text or '', '%S+') do out[#out + 1] = word end
  return out
end

-- The fields of one packed argument (a check's or a usage record's), which the caller joins with \31, the unit
-- separator: ids never hold control characters, and JSON escapes them.
-- One gmatch over the text with a separator appended (every field, empty ones too, ends with one): about 13k
-- instructions less per check than a find and a sub per field.
local function fields(text)
  local out, n = {}, 0
  for field in string.gmatch(text .. '\31', '([^\31]*)\31') do
    n = n + 1
    out[n] = field
  end
  return out
end

-- Is a scope key still the right place to count in? Window keys die with their window; the task key with its TTL.
local function scope_alive(key, until_ms, now)
  if until_ms == 0 then return redis.call('EXISTS', key) == 1 end
  return until_ms > now
end

-- Adds tokens and micro-USD to a counter pair ('used' or 'reserved') of every live scope of a reservation record.
local function add_to_scopes(record, field, tokens, usd, now)
  if tokens == 0 and usd == 0 then return end
  local keys, untils = words(record.scopes), words(record.untils)
  for i, key in ipairs(keys) do
    if scope_alive(key, tonumber(untils[i]), now) then
      if tokens ~= 0 then redis.call('HINCRBY', key, field, tokens) end
      if usd ~= 0 then redis.call('HINCRBY', key, field .. '_usd', usd) end
    end
  end
end

local function load_record(resv_key)
  local f = redis.call('HMGET', resv_key, 'state', 'amount', 'amount_usd', 'lease', 'scopes', 'untils')
  if not f[1] then return nil end
  return { state = f[1], amount = num(f[2]), amount_usd = num(f[3]), lease = num(f[4]), scopes = f[5], untils = f[6] }
end

-- Ends the hold of a live reservation: its amount stops counting as reserved. Returns the tokens handed back.
local function end_hold(resv_key, record, new_state, leases, now)
  add_to_scopes(record, 'reserved', -record.amount, -record.amount_usd, now)
  local task_key = words(record.scopes)[1]
  if task_key and redis.call('EXISTS', task_key) == 1 then redis.call('HINCRBY', task_key, 'active', -1) end
  redis.call('HSET', resv_key, 'state', new_state)
  redis.call('ZREM', leases, string.match(resv_key, '([^:]+)$'))
  return record.amount
end

-- A reservation's member in the leases set: its key without the reservation key prefix (purge_expired puts the prefix
-- back). Cut by position: matching the part after the last ':' instead cost about 10k instructions per check.
local function lease_member(resv_key, resv_prefix)
  if string.find(resv_key, resv_prefix, 1, true) == 1 then return string.sub(resv_key, #resv_prefix + 1) end
  return string.match(resv_key, '([^:]+)$')
end

-- Expired leases stop holding budget: no background job, every script sweeps a bounded batch first (PURGE_BATCH, or
-- `limit` when given).
local function purge_expired(leases, resv_prefix, now, limit)
  local expired = redis.call('ZRANGEBYSCORE', leases, '-inf', now, 'LIMIT', 0, limit or PURGE_BATCH)
  for _, id in ipairs(expired) do
    local resv_key = resv_prefix .. id
    local record = load_record(resv_key)
    if record and record.state == 'reserved' then
      end_hold(resv_key, record, 'expired', leases, now)
    else
      redis.call('ZREM', leases, id)
    end
  end
end

-- The sweep of a batch of n steps: as much as n calls of one step would sweep, up to 4 of them, so that one call never
-- holds the server long after a mass expiry (the rest goes with the next calls).
local function batch_sweep(n)
  return PURGE_BATCH * math.min(math.max(1, n), 4)
end

-- Is an argument a whole number from 0 to 2^53 (what the caller sends for times and amounts)?
local function whole(text)
  local value = tonumber(text)
  return value ~= nil and value >= 0 and value <= 9007199254740992 and value % 1 == 0
end

-- A task's counter: { limit, used, reserved, limit_usd, used_usd, reserved_usd } (limits -1 when none).
local function task_counter(task_key)
  local f = redis.call('HMGET', task_key, 'limit', 'used', 'reserved', 'limit_usd', 'used_usd', 'reserved_usd')
  local limit, limit_usd = LIMIT_NONE, LIMIT_NONE
  if f[1] then limit = tonumber(f[1]) end
  if f[4] then limit_usd = tonumber(f[4]) end
  return { limit, num(f[2]), num(f[3]), limit_usd, num(f[5]), num(f[6]) }
end

-- A window's counter, with its limits from the caller.
local function window_counter(key, limit, limit_usd)
  local f = redis.call('HMGET', key, 'used', 'reserved', 'used_usd', 'reserved_usd')
  return { tonumber(limit), num(f[1]), num(f[2]), tonumber(limit_usd), num(f[3]), num(f[4]) }
end

local function append_counter(out, c)
  for i = 1, 6 do out[#out + 1] = c[i] end
end

-- floor(limit * bp / 10000) without leaving the integers that doubles hold exactly (limit <= 10^15, bp <= 10000).
local function threshold(limit, bp)
  if limit == LIMIT_NONE or bp == LIMIT_NONE then return limit end
  local rest = limit % 10000
  return (limit - rest) / 10000 * bp + math.floor(rest * bp / 10000)
end

-- Does `tokens`/`usd` fit on top of a counter, against the given limits (-1: none)?
local function fits(c, tokens, usd, limit, limit_usd)
  if limit ~= LIMIT_NONE and c[2] + c[3] + tokens > limit then return false end
  if limit_usd ~= LIMIT_NONE and c[5] + c[6] + usd > limit_usd then return false end
  return true
end

-- A candidate's label as the sidecar sends it: '<input> <cached input> <output> <model> <decision>', the prices of the
-- model the candidate runs on (micro-USD per million tokens), the model's name (URL-quoted: no spaces), then the
-- decision it stands for (ALLOW or DEGRADE:rung). The reservation keeps them so that a report naming no model is
-- priced at the model the step was checked for. A bare decision (no prices) is taken as is.
local function candidate_label(text)
  local p_in, p_cached, p_out, model, decision = string.match(text, '^(%d+) (%d+) (%d+) (%S*) (.*)$')
  if not p_in then return text, '', '', '', '' end
  return decision, model, p_in, p_cached, p_out
end

-- ceil((uncached * p_in + cached * p_cached + output * p_out) / 10^6), exactly as _cost.actual_micros computes it.
-- Amounts reach 10^9 and prices 10^12, so a product can pass 2^53 (where doubles stop being exact): each price is split
-- at 10^6 and every partial product stays below 10^15, as threshold() does.
local MTOK = 1000000
local function cost_micros(amounts, prices)
  local quotient, rest = 0, 0
  for i = 1, #amounts do
    local amount, price = amounts[i], prices[i]
    local price_low = price % MTOK
    local low = amount * price_low
    local low_rest = low % MTOK
    quotient = quotient + amount * ((price - price_low) / MTOK) + (low - low_rest) / MTOK
    rest = rest + low_rest
  end
  local rest_rest = rest % MTOK
  quotient = quotient + (rest - rest_rest) / MTOK
  if rest_rest > 0 then quotient = quotient + 1 end
  return quotient
end

-- The checkpoint index of a tenant, for listing (lua/checkpoints.lua), next to the task hashes that hold the truth:
--   <p>ckpt:open       zset  checkpoint id -> opened at (ms); refreshed with each check the checkpoint stops
--   <p>ckpt:decided    zset  checkpoint id -> decided at (ms); decisions older than the task retention are trimmed
--   <p>ckpt:<sha1(id)> hash  task (its key), task_id, task_type, opened_at, state (open, approved, denied),
--                            decided_at, added, added_usd                     (expires after task retention)
-- Every key expires after the task retention, counted from its last write, like the tasks themselves. A member whose
-- checkpoint is gone (its task reset or expired) is dropped by the next listing that meets it; an open one whose task
-- expired, also by a later opening (drop_expired_open_checkpoints).

-- 'bw1:{tenant}:' of any key of the tenant: the tag is URL-quoted, so its first '}:' ends it.
local function tenant_prefix(key)
  return string.match(key, '^[^}]*}:')
end

local function checkpoint_info_key(prefix, id)
  return prefix .. 'ckpt:' .. redis.sha1hex(id)
end

-- Members of ckpt:open looked at, at most, each time a checkpoint opens (see drop_expired_open_checkpoints).
local OPEN_CHECKPOINTS_SWEPT = 4

-- An open checkpoint whose task expired leaves a member in ckpt:open that only a listing would drop; with nobody
-- listing, a tenant whose tasks keep reaching checkpoints grows the set without bound (bench/soak.py showed it).
-- So each opening drops up to a few such members itself. Only members opened more than the task retention ago can
-- be gone that way (a task expires the retention after its last check, which was no earlier than the opening), so
-- those are the ones looked at, oldest first; a member whose task still holds it open (still checked) stays. (So over
-- OPEN_CHECKPOINTS_SWEPT such long-waiting checkpoints at the head stall this until one is answered; listing drops
-- the rest as before.)
local function drop_expired_open_checkpoints(prefix, open, now, retention_ms)
  local old = redis.call('ZRANGEBYSCORE', open, '-inf', string.format('(%d', now - retention_ms), 'LIMIT', 0,
    OPEN_CHECKPOINTS_SWEPT)
  for _, id in ipairs(old) do
    local task_key = redis.call('HGET', checkpoint_info_key(prefix, id), 'task')
    if not task_key or redis.call('HGET', task_key, 'checkpoint') ~= id then redis.call('ZREM', open, id) end
  end
end

local function checkpoint_opened(task_key, id, now, retention_ms)
  local prefix = tenant_prefix(task_key)
  local info, open = checkpoint_info_key(prefix, id), prefix .. 'ckpt:open'
  local f = redis.call('HMGET', task_key, 'task_id', 'task_type')
  redis.call('HSET', info, 'task', task_key, 'task_id', f[1] or '', 'task_type', f[2] or '', 'opened_at', now,
    'state', 'open')
  redis.call('PEXPIRE', info, retention_ms)
  drop_expired_open_checkpoints(prefix, open, now, retention_ms)
  redis.call('ZADD', open, now, id)
  redis.call('PEXPIRE', open, retention_ms)
end

-- A check stopped by an open checkpoint keeps its index entries alive as long as its task.
local function checkpoint_waiting(task_key, id, retention_ms)
  local prefix = tenant_prefix(task_key)
  redis.call('PEXPIRE', checkpoint_info_key(prefix, id), retention_ms)
  redis.call('PEXPIRE', prefix .. 'ckpt:open', retention_ms)
end

-- state: 'approved' or 'denied'; added, added_usd: what an approval added to the ceilings (as text).
local function checkpoint_decided(task_key, id, state, added, added_usd, now, retention_ms)
  local prefix = tenant_prefix(task_key)
  local info, decided = checkpoint_info_key(prefix, id), prefix .. 'ckpt:decided'
  redis.call('ZREM', prefix .. 'ckpt:open', id)
  redis.call('HSET', info, 'task', task_key, 'state', state, 'decided_at', now, 'added', added, 'added_usd', added_usd)
  redis.call('HSETNX', info, 'opened_at', redis.call('HGET', task_key, 'checkpoint_at') or now)
  redis.call('HSETNX', info, 'task_id', redis.call('HGET', task_key, 'task_id') or '')
  redis.call('HSETNX', info, 'task_type', redis.call('HGET', task_key, 'task_type') or '')
  redis.call('PEXPIRE', info, retention_ms)
  redis.call('ZADD', decided, now, id)
  redis.call('ZREMRANGEBYSCORE', decided, '-inf', string.format('(%d', now - retention_ms))
  redis.call('PEXPIRE', decided, retention_ms)
end

-- Appends an entry to an audit stream, trimmed to `max_len` entries and to the entries written at most
-- `max_age_ms` before it, by Redis's clock (the one stream ids are made of: the caller's could be skewed). Exact
-- trims: admin calls are few, and retention is a promise. `fields` is a flat list of field, value.
local function audit_append(stream, fields, max_len, max_age_ms)
  local id = redis.call('XADD', stream, 'MAXLEN', max_len, '*', unpack(fields))
  local written_ms = tonumber(string.match(id, '^(%d+)'))
  redis.call('XTRIM', stream, 'MINID', string.format('%d', math.max(0, written_ms - tonumber(max_age_ms))))
end

local function counter_text(c)
  local out = {}
  for i = 1, 6 do out[i] = string.format('%d', c[i]) end
  return table.concat(out, ' ')
end

-- Notifications (delivered by the control plane, never waited for here): a tenant's events go to its stream
--   <p>notify          stream  type, time (ms), then the event's own fields           (expires after its retention)
--   <p>notify:dropped  string  events not written because the stream was full (taken by the control plane)
-- The stream is the delivery queue: the control plane deletes an entry once it is delivered (or given up), so its
-- length is what awaits delivery. A full stream keeps what it has and counts the new event as dropped. `config` is
-- { max_len, retention_ms } (max_len 0: no events).
local function notify_append(prefix, config, fields)
  local max_len = tonumber(config[1] or 0) or 0
  if max_len <= 0 then return end
  local stream = prefix .. 'notify'
  if redis.call('XLEN', stream) >= max_len then
    local dropped = prefix .. 'notify:dropped'
    redis.call('INCR', dropped)
    redis.call('PEXPIRE', dropped, config[2])
    return
  end
  redis.call('XADD', stream, '*', unpack(fields))
  redis.call('PEXPIRE', stream, config[2])
end

-- A checkpoint's event: what it is about and the task's counter as it stands.
local function notify_checkpoint(task_key, config, kind, id, now, extra)
  if tonumber(config[1] or 0) == nil or tonumber(config[1] or 0) <= 0 then return end
  local t = redis.call('HMGET', task_key, 'task_id', 'task_type')
  local fields = { 'type', 'checkpoint.' .. kind, 'time', string.format('%d', now), 'checkpoint_id', id,
    'task_id', t[1] or '', 'task_type', t[2] or '', 'task', counter_text(task_counter(task_key)) }
  for _, v in ipairs(extra or {}) do fields[#fields + 1] = v end
  notify_append(tenant_prefix(task_key), config, fields)
end
