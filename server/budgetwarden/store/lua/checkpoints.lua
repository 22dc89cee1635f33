-- Checkpoints: a page of a tenant's open checkpoints (oldest first) or decided ones (latest decision first), from the
-- tenant's checkpoint index (see _lib.lua). The truth of an open one is its task: a member whose task no longer has it
-- open (reset, or expired) is dropped from the index here, and so is a decided one whose record expired.
--
-- KEYS[1] the index (<p>ckpt:open or <p>ckpt:decided)
-- ARGV[1] 'open' or 'decided'   ARGV[2] page size   ARGV[3] score of the member the page starts after ('': the first
-- page)   ARGV[4] id of that member   ARGV[5] most members to look at in this call
-- Returns { more (0/1), score and id of the last member the page covers, then per checkpoint 15 values: id, task_id,
--   task_type, state, opened_at, decided_at, added, added_usd, task known (0/1), the task's limit, used, reserved,
--   limit_usd, used_usd, reserved_usd }
-- A page may hold fewer checkpoints than asked while more follow (more = 1): when dropped members used up ARGV[5].

local index, open = KEYS[1], ARGV[1] == 'open'
local size, budget = tonumber(ARGV[2]), tonumber(ARGV[5])
local after_score, after_id = ARGV[3], ARGV[4]
local prefix = tenant_prefix(index)

-- Sorted sets order members of equal score bytewise; Lua's own string comparison follows the server's locale.
local function bytes_less(a, b)
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end

local function past_cursor(id, score)
  if after_score == '' or tonumber(score) ~= tonumber(after_score) then return true end
  if open then return bytes_less(after_id, id) end
  return bytes_less(id, after_id)
end

-- The listed values of one member, or nil when its checkpoint is gone.
local function describe(id)
  local f = redis.call('HMGET', checkpoint_info_key(prefix, id), 'task', 'task_id', 'task_type', 'opened_at', 'state',
    'decided_at', 'added', 'added_usd')
  local task_key = f[1]
  if not task_key then return nil end
  local known = redis.call('EXISTS', task_key)
  if open then
    local t = redis.call('HMGET', task_key, 'checkpoint', 'checkpoint_at', 'task_id', 'task_type')
    if t[1] ~= id then return nil end
    f[2], f[3], f[4] = t[3] or f[2], t[4] or f[3], t[2] or f[4]
  end
  local out = { id, f[2] or '', f[3] or '', f[5] or 'open', num(f[4]), num(f[6]), num(f[7]), num(f[8]), known }
  append_counter(out, task_counter(task_key))
  return out
end

local out, found, looked, offset = { 0, after_score, after_id }, 0, 0, 0
local gone = {}
local from = after_score
if from == '' then from = open and '-inf' or '+inf' end
while looked < budget do
  local batch
  if open then
    batch = redis.call('ZRANGEBYSCORE', index, from, '+inf', 'WITHSCORES', 'LIMIT', offset, 64)
  else
    batch = redis.call('ZREVRANGEBYSCORE', index, from, '-inf', 'WITHSCORES', 'LIMIT', offset, 64)
  end
  if #batch == 0 then break end
  offset = offset + #batch / 2
  for i = 1, #batch, 2 do
    local id, score = batch[i], batch[i + 1]
    if past_cursor(id, score) then
      if found == size then
        out[1] = 1  -- a member follows the page
        break
      end
      looked = looked + 1
      local described = describe(id)
      if described then
        found = found + 1
        for _, v in ipairs(described) do out[#out + 1] = v end
      else
        gone[#gone + 1] = id
      end
      out[2], out[3] = score, id
      if looked >= budget then
        out[1] = 1
        break
      end
    end
  end
  if out[1] == 1 then break end
end
-- Dropped after the walk: removing members during it would shift the offsets.
for _, id in ipairs(gone) do redis.call('ZREM', index, id) end
return out
