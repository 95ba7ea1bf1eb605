-- A call ended. The first stop of a call is applied; any later one (a retry with the same
-- idempotency key, or a duplicate) changes nothing and gets the same charge back.
--
-- ARGV[1] call ref, ARGV[2] ended (ms), ARGV[3] cause, ARGV[4] idempotency key, ARGV[5]
-- answered '1'/'0', ARGV[6] final status of a call not answered ('0': unknown), ARGV[7] its
-- reason, ARGV[8] caller, ARGV[9] callee, ARGV[10] caller ingress IP (for an attempt billing
-- has no record of), ARGV[11] aor of KEYS[4..5], ARGV[12] its source, ARGV[13] now (ms),
-- ARGV[14] tombstone (ms), ARGV[15] cut-off grace (ms), ARGV[16..22] tariff if the call has
-- no record.
-- Returns {outcome, charge}: 'charged', 'awaiting_start' (answered, start not known yet),
-- 'released' (not answered: reservation freed, a CDR of the failed attempt with no charge),
-- 'duplicate', or 'retry' / 'need_tariff' (nothing changed; call again).

if not keys_match(ARGV[11], ARGV[12]) then return {'retry', 0} end
local cdr = redis.call('HMGET', KEYS[1], 'stop_key', 'charge_micros', 'answered_ms')
if cdr[1] then return {'duplicate', tonumber(cdr[2] or '0')} end
local now, tombstone, grace = tonumber(ARGV[13]), tonumber(ARGV[14]), tonumber(ARGV[15])
-- A recorded start means the call was answered, whatever the stop says.
if ARGV[5] ~= '1' and not cdr[3] then
  -- The failed attempt's CDR: final (charge 0), so a late start or stop changes nothing.
  redis.call('HSET', KEYS[1], 'ended_ms', ARGV[2], 'cause', ARGV[3], 'stop_key', ARGV[4],
    'charge_micros', '0')
  if ARGV[6] ~= '0' then redis.call('HSET', KEYS[1], 'status', ARGV[6]) end
  if ARGV[7] ~= '' then redis.call('HSET', KEYS[1], 'reason', ARGV[7]) end
  if ARGV[10] ~= '' then redis.call('HSET', KEYS[1], 'caller_ingress_ip', ARGV[10]) end
  fill_from_call()
  if ARGV[8] ~= '' then redis.call('HSETNX', KEYS[1], 'caller', ARGV[8]) end
  if ARGV[9] ~= '' then redis.call('HSETNX', KEYS[1], 'callee', ARGV[9]) end
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
  release(ARGV[1], now, tombstone)
  return {'released', 0}
end
local t = nil
if cdr[3] then
  t = snapshot_tariff(KEYS[3]) or argv_tariff(16)
  if not t then return {'need_tariff', 0} end
end
redis.call('HSET', KEYS[1], 'ended_ms', ARGV[2], 'cause', ARGV[3], 'stop_key', ARGV[4])
fill_from_call()
if cdr[3] then
  return {'charged', settle(ARGV[1], tonumber(cdr[3]), tonumber(ARGV[2]), t, now, tombstone, grace)}
end
-- Answered, but the start is not here yet: list the call by its end, and keep its
-- reservation until the start arrives and settles it.
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return {'awaiting_start', 0}
