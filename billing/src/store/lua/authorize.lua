-- Authorize one call: check the account, count its calls in progress and what they hold, find
-- how long the funds let this call last, and reserve that under the call ref. One script, so
-- concurrent authorizations on one balance are applied one after the other.
--
-- KEYS[1] account, KEYS[2] the account's reservations, KEYS[3] the call record
-- ARGV[1] call ref, ARGV[2] aor, ARGV[3] callee, ARGV[4] now (ms), ARGV[5] 'ok' or the
-- denial found before the script (unknown_account, blocked, no_rate), ARGV[6] cap (s, 0 =
-- none), ARGV[7] ceiling of a funded call (s), ARGV[8] hold of a call without limit (s),
-- ARGV[9] grace after the longest duration before a reservation lapses (ms),
-- ARGV[10..16] the tariff.
-- Returns {outcome, max duration (s), reserved}; outcome is 'allowed', 'repeat' (this call ref
-- was authorized before: the same answer, nothing reserved again), 'ended' or a denial.

local call = redis.call('HMGET', KEYS[3], 'state', 'aor', 'max_duration_secs', 'reserved_micros')
if call[1] then
  if call[1] == 'authorized' and call[2] == ARGV[2] then
    return {'repeat', tonumber(call[3]), tonumber(call[4])}
  end
  return {'ended', 0, 0}
end
if ARGV[5] ~= 'ok' then return {ARGV[5], 0, 0} end

local acct = redis.call('HMGET', KEYS[1], 'status', 'kind', 'balance_micros',
  'credit_limit_micros', 'max_concurrent_calls')
if not acct[1] then return {'unknown_account', 0, 0} end
if acct[1] == 'blocked' then return {'blocked', 0, 0} end

-- The account's other calls; reservations that lapsed (their stop was lost) are dropped.
local now = tonumber(ARGV[4])
local held, calls, latest = 0, 0, 0
local entries = redis.call('HGETALL', KEYS[2])
for i = 1, #entries, 2 do
  local amount, expires = string.match(entries[i + 1], '^(%-?%d+):(%d+)$')
  expires = tonumber(expires or '0')
  if expires <= now then
    redis.call('HDEL', KEYS[2], entries[i])
  else
    held = held + tonumber(amount)
    calls = calls + 1
    if expires > latest then latest = expires end
  end
end
local max_calls = tonumber(acct[5] or '0')
if max_calls > 0 and calls >= max_calls then return {'too_many_calls', 0, 0} end

-- rating::authorize, step for step.
local t = argv_tariff(10)
local cap = tonumber(ARGV[6])
local max_duration, reserve = cap, 0
local prepaid = acct[2] == 'prepaid'
if t.rated and (prepaid or acct[4]) then
  local available = tonumber(acct[3] or '0') - held
  if not prepaid then available = available + tonumber(acct[4]) end
  if available < price(t, t.first) then return {'insufficient_funds', 0, 0} end
  if t.per_minute == 0 then
    reserve = t.fee
  else
    local limit = tonumber(ARGV[7])
    if cap > 0 and cap < limit then limit = cap end
    local limit_price = price(t, billed_secs(limit, t.first, t.nxt))
    if limit_price <= available then
      max_duration, reserve = limit, limit_price
    else
      -- price(b) <= available  <=>  per_minute * b <= 60 * (available - fee)
      local affordable = idiv(60 * (available - t.fee), t.per_minute)
      max_duration = t.first + idiv(affordable - t.first, t.nxt) * t.nxt
      reserve = price(t, max_duration)
    end
  end
end

-- Reserve, with a deadline after which a call whose stop never came stops holding funds.
local hold = max_duration
if hold == 0 then hold = tonumber(ARGV[8]) end
local expires = now + hold * 1000 + tonumber(ARGV[9])
redis.call('HSET', KEYS[2], ARGV[1], int(reserve) .. ':' .. int(expires))
if expires > latest then latest = expires end
redis.call('PEXPIREAT', KEYS[2], int(latest))
redis.call('HSET', KEYS[3], 'state', 'authorized', 'aor', ARGV[2], 'callee', ARGV[3],
  'authorized_ms', ARGV[4], 'max_duration_secs', int(max_duration),
  'reserved_micros', int(reserve), 'expires_ms', int(expires))
if t.rated then
  redis.call('HSET', KEYS[3], 'rated', '1', 'rate_plan', t.plan, 'rate_prefix', t.prefix,
    'rate_micros_per_minute', int(t.per_minute), 'connection_fee_micros', int(t.fee),
    'first_increment_secs', int(t.first), 'next_increment_secs', int(t.nxt))
else
  redis.call('HSET', KEYS[3], 'rated', '0')
end
redis.call('PEXPIREAT', KEYS[3], int(expires))
return {'allowed', max_duration, reserve}
