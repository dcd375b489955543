-- Re-setup: removes seats, the license, the reconcile status and a pending
-- initialization. The tryout record is not among the keys: it survives.
-- KEYS[4..] the keys to remove.
if not has_epoch() then return {'noepoch'} end
for i = 4, #KEYS do redis.call('DEL', KEYS[i]) end
return {'ok', tostring(bump({'k', 'reset'}))}
