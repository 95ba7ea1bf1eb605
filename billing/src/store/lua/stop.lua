-- A call ended. The first stop of a call is applied; any later one (a retry with the same
-- idempotency key, or a duplicate) changes nothing and gets the same charge back.
--
-- ARGV[1] call ref, ARGV[2] ended (ms), ARGV[3] cause, ARGV[4] idempotency key, ARGV[5]
-- answered '1'/'0', ARGV[6] aor of KEYS[4..5], ARGV[7] its source, ARGV[8] now (ms), ARGV[9]
-- tombstone (ms), ARGV[10] cut-off grace (ms), ARGV[11..17] tariff if the call has no record.
-- Returns {outcome, charge}: 'charged', 'awaiting_start' (answered, start not known yet),
-- 'released' (not answered: reservation freed, no CDR), 'duplicate', or 'retry' /
-- 'need_tariff' (nothing changed; call again).

if not keys_match(ARGV[6], ARGV[7]) then return {'retry', 0} end
local cdr = redis.call('HMGET', KEYS[1], 'stop_key', 'charge_micros', 'answered_ms')
if cdr[1] then return {'duplicate', tonumber(cdr[2] or '0')} end
local now, tombstone, grace = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
-- A recorded start means the call was answered, whatever the stop says.
if ARGV[5] ~= '1' and not cdr[3] then
  release(ARGV[1], now, tombstone)
  return {'released', 0}
end
local t = nil
if cdr[3] then
  t = snapshot_tariff(KEYS[3]) or argv_tariff(11)
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
