-- Shared by every call script: exact integer arithmetic, and the tariff formulas of
-- `billing/src/rating.rs`, which is their specification (the store tests compare the two).
-- Lua numbers are doubles: every value stays below 2^53 (see `money.rs`), and quotients are
-- corrected so that the rounding of a floating-point division never shows.

-- floor(a / b) for b > 0.
local function idiv(a, b)
  local q = math.floor(a / b)
  while q * b > a do q = q - 1 end
  while (q + 1) * b <= a do q = q + 1 end
  return q
end

-- ceil(a / b) for b > 0.
local function cdiv(a, b)
  return -idiv(-a, b)
end

-- An integer as a Redis argument ('1e+15' is what plain conversion would give).
local function int(x)
  return string.format('%d', x)
end

-- At least the first increment, then whole next increments.
local function billed_secs(secs, first, nxt)
  if secs <= first then return first end
  return first + cdiv(secs - first, nxt) * nxt
end

-- fee + ceil(per_minute * billed / 60), split per whole minute so that no intermediate value
-- is larger than the result.
local function price(t, billed)
  local minutes = idiv(billed, 60)
  return t.fee + t.per_minute * minutes + cdiv(t.per_minute * (billed - minutes * 60), 60)
end

-- A tariff passed as 7 arguments from ARGV[i]: kind ('none' | 'unrated' | 'rated'), plan,
-- prefix, rate per minute, fee, first and next increment. 'none' gives nil.
local function argv_tariff(i)
  local kind = ARGV[i]
  if kind == 'none' then return nil end
  if kind ~= 'rated' then return {rated = false} end
  return {rated = true, plan = ARGV[i + 1], prefix = ARGV[i + 2],
    per_minute = tonumber(ARGV[i + 3]), fee = tonumber(ARGV[i + 4]),
    first = tonumber(ARGV[i + 5]), nxt = tonumber(ARGV[i + 6])}
end

-- The tariff an authorization stored in a call record, or nil without a record.
local function snapshot_tariff(call_key)
  local r = redis.call('HMGET', call_key, 'rated', 'rate_plan', 'rate_prefix',
    'rate_micros_per_minute', 'connection_fee_micros', 'first_increment_secs',
    'next_increment_secs')
  if not r[1] then return nil end
  if r[1] ~= '1' then return {rated = false} end
  return {rated = true, plan = r[2], prefix = r[3], per_minute = tonumber(r[4]),
    fee = tonumber(r[5]), first = tonumber(r[6]), nxt = tonumber(r[7])}
end
