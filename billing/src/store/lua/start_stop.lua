-- An answered call's start and stop together (the processors' usual accounting): the same end
-- state as start.lua followed by stop.lua, in one script and with half the commands. Only
-- for a call billing has heard nothing of yet; otherwise it says 'separate' and the caller
-- applies the start and the stop one after the other, which handles every order.
--
-- ARGV[1] call ref, ARGV[2] caller, ARGV[3] callee, ARGV[4] caller ingress IP, ARGV[5] callee
-- ingress IP, ARGV[6] answered (ms), ARGV[7] ended (ms), ARGV[8] cause, ARGV[9] idempotency
-- key, ARGV[10] aor of KEYS[4..5], ARGV[11] its source, ARGV[12] now (ms), ARGV[13] tombstone
-- (ms), ARGV[14] cut-off grace (ms), ARGV[15..21] tariff if the call has no record.
-- Returns {outcome, charge}: 'charged', 'duplicate' (already charged: nothing changes),
-- 'separate', or 'retry' / 'need_tariff' (nothing changed; call again).

if not keys_match(ARGV[10], ARGV[11]) then return {'retry', 0} end
local cdr = redis.call('HMGET', KEYS[1], 'stop_key', 'charge_micros', 'answered_ms')
if cdr[2] then return {'duplicate', tonumber(cdr[2])} end
if cdr[1] or cdr[3] then return {'separate', 0} end
local t = snapshot_tariff(KEYS[3]) or argv_tariff(15)
if not t then return {'need_tariff', 0} end
redis.call('HSET', KEYS[1], 'caller', ARGV[2], 'callee', ARGV[3], 'caller_ingress_ip', ARGV[4],
  'callee_ingress_ip', ARGV[5], 'answered_ms', ARGV[6], 'ended_ms', ARGV[7], 'cause', ARGV[8],
  'stop_key', ARGV[9])
fill_from_call()
redis.call('ZADD', KEYS[2], ARGV[6], ARGV[1])
return {'charged', settle(ARGV[1], tonumber(ARGV[6]), tonumber(ARGV[7]), t, tonumber(ARGV[12]),
  tonumber(ARGV[13]), tonumber(ARGV[14]))}
