-- Stores the initialization just issued. KEYS[5] the record, ARGV[2] its value.
local refusal = refused()
if refusal then return refusal end
redis.call('SET', KEYS[5], ARGV[2])
return {'ok', tostring(bump({'k', 'init', 'd', ARGV[2]}))}
