-- A call was answered. Records the start; if its stop came first (the start was queued while
-- billing was away), the call is charged now.
--
-- ARGV[1] call ref, ARGV[2] caller, ARGV[3] callee, ARGV[4] caller ingress IP, ARGV[5] callee
-- ingress IP, ARGV[6] answered (ms), ARGV[7] aor of KEYS[4..5], ARGV[8] its source, ARGV[9]
-- now (ms), ARGV[10] tombstone (ms), ARGV[11] cut-off grace (ms), ARGV[12..18] tariff if the
-- call has no record.
-- Returns {outcome, charge}: 'recorded', 'charged', 'duplicate' (already charged: nothing
-- changes), 'retry' or 'need_tariff' (nothing changed; call again).

if not keys_match(ARGV[7], ARGV[8]) then return {'retry', 0} end
local cdr = redis.call('HMGET', KEYS[1], 'stop_key', 'charge_micros', 'ended_ms')
if cdr[2] then return {'duplicate', tonumber(cdr[2])} end
local t = nil
if cdr[1] then
  t = snapshot_tariff(KEYS[3]) or argv_tariff(12)
  if not t then return {'need_tariff', 0} end
end
redis.call('HSET', KEYS[1], 'caller', ARGV[2], 'callee', ARGV[3], 'caller_ingress_ip', ARGV[4],
  'callee_ingress_ip', ARGV[5], 'answered_ms', ARGV[6])
fill_from_call()
redis.call('ZADD', KEYS[2], ARGV[6], ARGV[1])
if cdr[1] then
  local charge = settle(ARGV[1], tonumber(ARGV[6]), tonumber(cdr[3]), t, tonumber(ARGV[9]),
    tonumber(ARGV[10]), tonumber(ARGV[11]))
  return {'charged', charge}
end
return {'recorded', 0}
