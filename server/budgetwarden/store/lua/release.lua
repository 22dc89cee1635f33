-- Release: hand back a reservation whose step will not run.
--
-- KEYS[1] reservation record   KEYS[2] tenant leases
-- ARGV[1] now (ms)   ARGV[2] reservation key prefix
--
-- Returns { status, amount handed back }
-- status: 1 released, 2 already released, 3 already reported, 4 lease had expired, 5 no such reservation.

local resv_key, leases = KEYS[1], KEYS[2]
local now = tonumber(ARGV[1])

purge_expired(leases, ARGV[2], now)

local record = load_record(resv_key)
if not record then return { 5, 0 } end
if record.state == 'released' then return { 2, 0 } end
if record.state == 'reported' then return { 3, 0 } end
if record.state == 'expired' then return { 4, 0 } end
if record.lease <= now then
  end_hold(resv_key, record, 'expired', leases, now)
  return { 4, 0 }
end
return { 1, end_hold(resv_key, record, 'released', leases, now) }
