-- Shared by the start and stop scripts.
-- KEYS[1] CDR, KEYS[2] CDR index, KEYS[3] call record, KEYS[4] account, KEYS[5] reservations

-- The account keys were chosen by the caller from the call record ('call') or, without one,
-- from what else it knew ('other'). If that changed since, the caller re-reads and retries.
local function keys_match(aor, source)
  local owner = redis.call('HGET', KEYS[3], 'aor')
  if owner then return source == 'call' and owner == aor end
  return source ~= 'call'
end

-- Frees the call's funds and concurrent-call slot. The call record stays a while as a
-- tombstone, so that a late Authorize of the same call ref cannot reserve again.
local function release(call_ref, now, tombstone_ms)
  redis.call('HDEL', KEYS[5], call_ref)
  if redis.call('EXISTS', KEYS[3]) == 1 then
    redis.call('HSET', KEYS[3], 'state', 'ended')
    redis.call('PEXPIREAT', KEYS[3], int(now + tombstone_ms))
  end
end

-- What the authorization knew, where the start has not said it.
local function fill_from_call()
  local c = redis.call('HMGET', KEYS[3], 'aor', 'callee', 'max_duration_secs')
  if c[1] then redis.call('HSETNX', KEYS[1], 'caller', c[1]) end
  if c[2] then redis.call('HSETNX', KEYS[1], 'callee', c[2]) end
  if c[3] then redis.call('HSETNX', KEYS[1], 'max_duration_secs', c[3]) end
end

-- Prices the call, debits the account (if it still exists) and releases the reservation.
-- Callers get here once per call: only while the CDR has no charge_micros.
local function settle(call_ref, answered_ms, ended_ms, t, now, tombstone_ms, grace_ms)
  local d = ended_ms - answered_ms
  if d < 0 then d = 0 end
  local charge = 0
  redis.call('HSET', KEYS[1], 'duration_ms', int(d))
  if t.rated then
    -- rating::billable_ms: a call cut off at its max duration costs what was reserved.
    local billable = d
    local max_ms = tonumber(redis.call('HGET', KEYS[3], 'max_duration_secs') or '0') * 1000
    if max_ms > 0 and d > max_ms and d <= max_ms + grace_ms then billable = max_ms end
    local billed = billed_secs(cdiv(billable, 1000), t.first, t.nxt)
    charge = price(t, billed)
    redis.call('HSET', KEYS[1], 'billed_secs', int(billed), 'rate_plan', t.plan,
      'rate_prefix', t.prefix)
  end
  redis.call('HSET', KEYS[1], 'charge_micros', int(charge))
  if charge ~= 0 and redis.call('EXISTS', KEYS[4]) == 1 then
    redis.call('HINCRBY', KEYS[4], 'balance_micros', int(-charge))
  end
  release(call_ref, now, tombstone_ms)
  return charge
end
