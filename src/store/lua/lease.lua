-- Takes the reconcile lease if free. KEYS[1] the lease, KEYS[2] the fencing counter.
-- ARGV[1] holder, ARGV[2] ttl in ms. Returns the new fencing token, or 0.
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('INCR', KEYS[2])
end
return 0
