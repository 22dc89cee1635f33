-- Budget: read a task's counter and its tenant's windows, after sweeping expired leases.
--
-- KEYS[1] tenant leases   KEYS[2] task   KEYS[3..] tenant windows
-- ARGV[1] now (ms)   ARGV[2] reservation key prefix   then per window: token limit, micro-USD limit (-1: none)
--
-- Returns { task known (0/1), task type, active reservations, open checkpoint id, checkpoint opened at (ms),
--           closed (0/1), soft bp, checkpoint bp, then per scope (task first): limit, used, reserved, limit_usd,
--           used_usd, reserved_usd }

local leases, task_key = KEYS[1], KEYS[2]
local now = tonumber(ARGV[1])

purge_expired(leases, ARGV[2], now)

local f = redis.call('HMGET', task_key, 'task_type', 'active', 'checkpoint', 'checkpoint_at', 'closed', 'soft_bp',
  'ckpt_bp')
local out = { redis.call('EXISTS', task_key), f[1] or '', num(f[2]), f[3] or '', num(f[4]), num(f[5]),
  tonumber(f[6] or LIMIT_NONE), tonumber(f[7] or LIMIT_NONE) }
append_counter(out, task_counter(task_key))
for i = 3, #KEYS do
  append_counter(out, window_counter(KEYS[i], ARGV[3 + 2 * (i - 3)], ARGV[4 + 2 * (i - 3)]))
end
return out
