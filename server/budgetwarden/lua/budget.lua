-- Budget: read a task's counter and its tenant's windows, after sweeping expired leases.
--
-- KEYS[1] tenant leases   KEYS[2] task   KEYS[3..] tenant windows
-- ARGV[1] now (ms)   ARGV[2] reservation key prefix   then per window: its limit (-1: none)
--
-- Returns { task known (0/1), task type, active reservations, then limit, used, reserved per scope (task first) }

local leases, task_key = KEYS[1], KEYS[2]
local now = tonumber(ARGV[1])

purge_expired(leases, ARGV[2], now)

local known = redis.call('EXISTS', task_key)
local f = redis.call('HMGET', task_key, 'task_type', 'active')
local limit, used, reserved = task_counter(task_key)
local out = { known, f[1] or '', num(f[2]), limit, used, reserved }
for i = 3, #KEYS do
  local w = redis.call('HMGET', KEYS[i], 'used', 'reserved')
  out[#out + 1] = tonumber(ARGV[i]); out[#out + 1] = num(w[1]); out[#out + 1] = num(w[2])
end
return out
