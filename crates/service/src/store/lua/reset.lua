-- Re-setup: removes seats, the license, the reconcile status and a pending
-- initialization. The tryout record is not among the keys: it survives. The
-- license document becomes the retired one, so that an older document is never
-- applied after a re-setup (the service refuses documents older than either).
-- KEYS[5] the license, KEYS[6] the retired license, KEYS[7..] the keys to remove
-- (the seat pools and their order sets among them).
local refusal = refused()
if refusal then return refusal end
local record = redis.call('HGET', KEYS[5], 'record')
if record then redis.call('SET', KEYS[6], record) end
redis.call('DEL', KEYS[5])
for i = 7, #KEYS do redis.call('DEL', KEYS[i]) end
local v = bump({'k', 'reset'})
-- No seats left: the (empty) order sets are true, whatever they were before.
redis.call('SET', KEYS[4], v)
return {'ok', tostring(v)}
