-- Re-setup: removes seats, the license, the reconcile status and a pending
-- initialization. The tryout record is not among the keys: it survives. The
-- license document becomes the retired one, so that an older document is never
-- applied after a re-setup (the service refuses documents older than either).
-- KEYS[4] the license, KEYS[5] the retired license, KEYS[6..] the keys to remove.
local refusal = refused()
if refusal then return refusal end
local record = redis.call('HGET', KEYS[4], 'record')
if record then redis.call('SET', KEYS[5], record) end
redis.call('DEL', KEYS[4])
for i = 6, #KEYS do redis.call('DEL', KEYS[i]) end
return {'ok', tostring(bump({'k', 'reset'}))}
