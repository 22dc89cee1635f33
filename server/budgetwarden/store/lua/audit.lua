-- Audit: append one entry to an audit stream (a refused admin call: nothing else was done).
--
-- KEYS[1] the stream   ARGV[1] entries kept at most   ARGV[2] how long entries are kept (ms)   ARGV[3..] the entry's
-- fields and values
local fields = {}
for i = 3, #ARGV do fields[#fields + 1] = ARGV[i] end
audit_append(KEYS[1], fields, ARGV[1], ARGV[2])
return 1
