-- The KEEP entries of a reliable shard's keys (see `keep_keys` in frames.lua).
-- KEYS: 1 leases, 2 inflight, 3 acks, 4 delayed, 5 dead, 6 ready count. Returns 1.
keep_keys(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6])
return 1
