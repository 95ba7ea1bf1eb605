//! Tariffs, without I/O: which rate applies to a destination, what a call costs, and how long
//! the available funds let a call last.
//!
//! This module is the specification of the pricing. The Redis scripts in
//! [`crate::store`] apply the same formulas atomically (they have to: the funds check and the
//! reservation must happen in one step), and the store tests compare the two.
//!
//! A call of `d` seconds (the answered duration, see [`billable_ms`], rounded **up** to whole
//! seconds) is billed
//! `first + ceil((d − first) / next) × next` seconds (at least `first`), and costs
//! `fee + ceil(rate_per_minute × billed / 60)` micro-units: the rate is applied per second and
//! only the final amount is rounded, up, to a whole micro-unit.

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::money;

/// Prefix under which a rate plan stores the entry that matches every destination.
pub const DEFAULT_PREFIX: &str = "default";

/// Highest rate per minute an operator may set: 10 000.00. Together with
/// [`FUNDED_CEILING_SECS`] it keeps every product in the pricing below 2^53 (see
/// [`crate::money`]).
pub const MAX_RATE_MICROS_PER_MINUTE: i64 = 10_000 * money::MICROS_PER_UNIT;

/// Highest connection fee: 1 000 000.00.
pub const MAX_FEE_MICROS: i64 = 1_000_000 * money::MICROS_PER_UNIT;

/// Longest billing increment: one hour.
pub const MAX_INCREMENT_SECS: u32 = 3_600;

/// Longest call that funds are counted for in one authorization (24 h). When the funds would
/// buy more, the call is authorized for this long; it also bounds what a lost stop can hold.
pub const FUNDED_CEILING_SECS: u32 = 86_400;

/// How far past its max duration a call may end and still be billed for the max duration
/// only. The processor's cut-off timer and BYE take a few milliseconds, and with per-minute
/// increments one millisecond past 600 s would otherwise cost a whole extra minute the
/// reservation did not cover. A call that ends later than this was not cut off (a processor
/// failed): it is billed for its true length.
pub const CUTOFF_GRACE_MS: u64 = 2_000;

/// The length a call is billed for: its duration, except that a call ending within
/// [`CUTOFF_GRACE_MS`] after its max duration (0 = none) is billed for the max duration.
pub fn billable_ms(duration_ms: u64, max_duration_secs: u32) -> u64 {
    let max_ms = u64::from(max_duration_secs) * 1000;
    if max_ms > 0 && duration_ms > max_ms && duration_ms <= max_ms + CUTOFF_GRACE_MS {
        max_ms
    } else {
        duration_ms
    }
}

/// One entry of a rate plan: the price of calls to destinations starting with its prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    /// Price of a minute, applied per second.
    pub rate_micros_per_minute: i64,
    /// Charged once for every answered call.
    pub connection_fee_micros: i64,
    /// The first increment: an answered call is billed at least this long.
    pub first_increment_secs: u32,
    /// Every further increment; billed time is rounded up to a multiple of it.
    pub next_increment_secs: u32,
}

/// What a finished call costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Charge {
    /// Seconds billed: the duration rounded up to the increments.
    pub billed_secs: u64,
    /// Connection fee plus the price of the billed seconds.
    pub charge_micros: i64,
}

impl Rate {
    /// Checks the bounds that keep the pricing exact: non-negative amounts within
    /// [`MAX_RATE_MICROS_PER_MINUTE`] / [`MAX_FEE_MICROS`], increments from 1 s to 1 h.
    pub fn validate(&self) -> Result<(), Error> {
        if !(0..=MAX_RATE_MICROS_PER_MINUTE).contains(&self.rate_micros_per_minute) {
            return Err(Error::InvalidInput {
                what: "--per-minute",
                reason: format!("must be from 0 to {}", money::format(MAX_RATE_MICROS_PER_MINUTE)),
            });
        }
        if !(0..=MAX_FEE_MICROS).contains(&self.connection_fee_micros) {
            return Err(Error::InvalidInput {
                what: "--fee",
                reason: format!("must be from 0 to {}", money::format(MAX_FEE_MICROS)),
            });
        }
        for secs in [self.first_increment_secs, self.next_increment_secs] {
            if !(1..=MAX_INCREMENT_SECS).contains(&secs) {
                return Err(Error::InvalidInput {
                    what: "--increments",
                    reason: format!("each increment must be 1 to {MAX_INCREMENT_SECS} seconds"),
                });
            }
        }
        Ok(())
    }

    /// `first/next`, as `--increments` takes it.
    pub fn increments(&self) -> String {
        format!("{}/{}", self.first_increment_secs, self.next_increment_secs)
    }

    /// Seconds billed for a call of `secs` seconds: at least the first increment, then whole
    /// next increments.
    pub fn billed_secs(&self, secs: u64) -> u64 {
        let first = u64::from(self.first_increment_secs);
        let next = u64::from(self.next_increment_secs).max(1);
        if secs <= first { first } else { first + (secs - first).div_ceil(next) * next }
    }

    /// Price of `billed_secs` seconds: the fee plus the per-second rate, rounded up to a whole
    /// micro-unit. Saturates at `i64::MAX` (only reachable with values `validate` refuses).
    pub fn price(&self, billed_secs: u64) -> i64 {
        let time = (i128::from(self.rate_micros_per_minute) * i128::from(billed_secs) + 59) / 60;
        let total = i128::from(self.connection_fee_micros) + time;
        i64::try_from(total).unwrap_or(i64::MAX)
    }

    /// The charge of an answered call that lasted `duration_ms` (rounded up to whole seconds).
    pub fn charge(&self, duration_ms: u64) -> Charge {
        let billed_secs = self.billed_secs(duration_ms.div_ceil(1000));
        Charge { billed_secs, charge_micros: self.price(billed_secs) }
    }
}

/// Parses `--increments`: `first/next` in seconds (`60/60`, `1/1`, `30/6`), or one number for
/// both.
pub fn parse_increments(text: &str) -> Result<(u32, u32), Error> {
    let bad = || Error::InvalidInput {
        what: "--increments",
        reason: format!("{text:?}: expected FIRST/NEXT in seconds, e.g. 60/60 or 1/1"),
    };
    let (first, next) = text.split_once('/').unwrap_or((text, text));
    let first: u32 = first.trim().parse().map_err(|_| bad())?;
    let next: u32 = next.trim().parse().map_err(|_| bad())?;
    Ok((first, next))
}

/// Normalises a rate-plan prefix as typed: digits (a leading `+` is dropped), or `default` /
/// empty for the entry matching every destination.
pub fn normalize_prefix(text: &str) -> Result<String, Error> {
    let digits = text.strip_prefix('+').unwrap_or(text);
    if digits.is_empty() || text == DEFAULT_PREFIX {
        return Ok(DEFAULT_PREFIX.to_owned());
    }
    if digits.len() > 32 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Error::InvalidInput {
            what: "--prefix",
            reason: format!("{text:?}: expected digits (a leading + is ignored) or \"default\""),
        });
    }
    Ok(digits.to_owned())
}

/// Checks a rate-plan name: 1 to 64 characters of `A-Z a-z 0-9 _ . -`. It becomes part of a
/// Redis key and is typed on command lines, so nothing that needs quoting is allowed.
pub fn validate_plan_name(what: &'static str, name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidInput {
            what,
            reason: format!("{name:?}: 1 to 64 characters of A-Z a-z 0-9 _ . -"),
        })
    }
}

/// The number rated for a callee: the user part of `user@domain` (the whole string without
/// `@`), without a leading `+`.
pub fn destination(callee: &str) -> &str {
    let user = callee.split_once('@').map_or(callee, |(user, _)| user);
    user.strip_prefix('+').unwrap_or(user)
}

/// The plan entries that could match `destination`, best first: every all-digit prefix of it,
/// longest first, then [`DEFAULT_PREFIX`]. A destination that is not a number (`bob`) only
/// matches the default entry.
pub fn candidate_prefixes(destination: &str) -> Vec<String> {
    let digits = destination.bytes().take_while(u8::is_ascii_digit).count();
    let mut keys: Vec<String> = (1..=digits).rev().map(|n| destination[..n].to_owned()).collect();
    keys.push(DEFAULT_PREFIX.to_owned());
    keys
}

/// The longest-prefix match for `destination` among a plan's entries, looked up with `entry`
/// (prefix → rate). Returns the matching prefix (or [`DEFAULT_PREFIX`]) and its rate.
pub fn best_match(
    destination: &str,
    mut entry: impl FnMut(&str) -> Option<Rate>,
) -> Option<(String, Rate)> {
    candidate_prefixes(destination).into_iter().find_map(|prefix| {
        let rate = entry(&prefix)?;
        Some((prefix, rate))
    })
}

/// What the caller has to spend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Funds {
    /// A postpaid account without a credit limit.
    Unlimited,
    /// Balance (plus credit limit, for postpaid) minus what other calls have reserved. May be
    /// negative.
    Available(i64),
}

/// The outcome of the funds check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// The call may last `max_duration_secs` (0 = no limit); `reserve_micros` is held until
    /// its stop.
    Allowed {
        /// Longest the call may last; 0 means no limit.
        max_duration_secs: u32,
        /// What its longest duration would cost: held from the funds of other calls.
        reserve_micros: i64,
    },
    /// The funds do not buy the connection fee and the first increment.
    InsufficientFunds,
}

/// How long a call may last. `cap_secs` is `default_max_duration_secs` (0 = none).
///
/// - No rate (an account without a rate plan) or unlimited credit: `cap_secs`, nothing held.
/// - Otherwise the funds must cover the fee and the first increment. The call may last up to
///   the longest whole-increment duration whose price the funds cover, at most `cap_secs` and
///   [`FUNDED_CEILING_SECS`] (a rate of 0 needs no ceiling: `cap_secs`), and the price of that
///   duration is reserved.
pub fn authorize(rate: Option<&Rate>, funds: Funds, cap_secs: u32) -> Grant {
    let (Some(rate), Funds::Available(available)) = (rate, funds) else {
        return Grant::Allowed { max_duration_secs: cap_secs, reserve_micros: 0 };
    };
    let first = u64::from(rate.first_increment_secs);
    if available < rate.price(first) {
        return Grant::InsufficientFunds;
    }
    if rate.rate_micros_per_minute == 0 {
        return Grant::Allowed {
            max_duration_secs: cap_secs,
            reserve_micros: rate.connection_fee_micros,
        };
    }
    let limit = if cap_secs == 0 { FUNDED_CEILING_SECS } else { cap_secs.min(FUNDED_CEILING_SECS) };
    let limit_billed = rate.billed_secs(u64::from(limit));
    if rate.price(limit_billed) <= available {
        return Grant::Allowed {
            max_duration_secs: limit,
            reserve_micros: rate.price(limit_billed),
        };
    }
    // The funds run out before `limit`: the longest whole-increment duration they pay for.
    // price(b) <= available  <=>  rate * b <= 60 * (available - fee), as the price rounds up.
    let budget = i128::from(available - rate.connection_fee_micros);
    let affordable =
        u64::try_from(budget * 60 / i128::from(rate.rate_micros_per_minute)).unwrap_or(0);
    let next = u64::from(rate.next_increment_secs).max(1);
    let secs = first + (affordable.saturating_sub(first) / next) * next;
    Grant::Allowed {
        // Below `limit` (a u32) by construction.
        max_duration_secs: u32::try_from(secs).unwrap_or(limit),
        reserve_micros: rate.price(secs),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(per_minute: i64, fee: i64, first: u32, next: u32) -> Rate {
        Rate {
            rate_micros_per_minute: per_minute,
            connection_fee_micros: fee,
            first_increment_secs: first,
            next_increment_secs: next,
        }
    }

    const TEN_CENTS: i64 = 100_000;

    #[test]
    fn one_unit_at_ten_cents_a_minute_buys_600_seconds() {
        let r = rate(TEN_CENTS, 0, 60, 60);
        assert_eq!(
            authorize(Some(&r), Funds::Available(1_000_000), 0),
            Grant::Allowed { max_duration_secs: 600, reserve_micros: 1_000_000 }
        );
        // The configured cap still applies, and only its price is held.
        assert_eq!(
            authorize(Some(&r), Funds::Available(1_000_000), 300),
            Grant::Allowed { max_duration_secs: 300, reserve_micros: 500_000 }
        );
    }

    #[test]
    fn per_minute_increments() {
        let r = rate(TEN_CENTS, 0, 60, 60);
        let cases = [(0, 60, 100_000), (1, 60, 100_000), (60, 60, 100_000), (61, 120, 200_000)];
        for (secs, billed, price) in cases {
            assert_eq!(r.billed_secs(secs), billed, "{secs} s");
            assert_eq!(r.price(billed), price, "{secs} s");
        }
        // Milliseconds round up to the second first: 60.001 s is 61 s, hence two minutes.
        assert_eq!(r.charge(60_000), Charge { billed_secs: 60, charge_micros: 100_000 });
        assert_eq!(r.charge(60_001), Charge { billed_secs: 120, charge_micros: 200_000 });
    }

    #[test]
    fn per_second_increments_round_the_final_amount_up() {
        // 0.10 per minute is 1666.67 micro-units a second.
        let r = rate(TEN_CENTS, 0, 1, 1);
        assert_eq!(r.charge(0), Charge { billed_secs: 1, charge_micros: 1_667 });
        assert_eq!(r.charge(1_000), Charge { billed_secs: 1, charge_micros: 1_667 });
        assert_eq!(r.charge(1_001), Charge { billed_secs: 2, charge_micros: 3_334 });
        assert_eq!(r.charge(59_000), Charge { billed_secs: 59, charge_micros: 98_334 });
        assert_eq!(r.charge(60_000), Charge { billed_secs: 60, charge_micros: 100_000 });
    }

    #[test]
    fn thirty_then_six_second_increments() {
        let r = rate(120_000, 0, 30, 6);
        let cases = [(1, 30), (30, 30), (31, 36), (36, 36), (37, 42), (90, 90), (91, 96)];
        for (secs, billed) in cases {
            assert_eq!(r.billed_secs(secs), billed, "{secs} s");
        }
        // 0.12 per minute = 2000 per second.
        assert_eq!(r.price(36), 72_000);
        // Funds of 0.07 buy 35 s of rate; durations are whole increments: 30 s.
        assert_eq!(
            authorize(Some(&r), Funds::Available(70_000), 0),
            Grant::Allowed { max_duration_secs: 30, reserve_micros: 60_000 }
        );
        assert_eq!(
            authorize(Some(&r), Funds::Available(72_000), 0),
            Grant::Allowed { max_duration_secs: 36, reserve_micros: 72_000 }
        );
    }

    #[test]
    fn connection_fee_only() {
        let r = rate(0, 250_000, 60, 60);
        assert_eq!(r.charge(0).charge_micros, 250_000);
        assert_eq!(r.charge(3_600_000).charge_micros, 250_000);
        assert_eq!(authorize(Some(&r), Funds::Available(249_999), 0), Grant::InsufficientFunds);
        assert_eq!(
            authorize(Some(&r), Funds::Available(250_000), 0),
            Grant::Allowed { max_duration_secs: 0, reserve_micros: 250_000 }
        );
        assert_eq!(
            authorize(Some(&r), Funds::Available(250_000), 7_200),
            Grant::Allowed { max_duration_secs: 7_200, reserve_micros: 250_000 }
        );
    }

    #[test]
    fn fee_and_first_increment_are_the_minimum() {
        let r = rate(TEN_CENTS, 50_000, 60, 60);
        assert_eq!(authorize(Some(&r), Funds::Available(149_999), 0), Grant::InsufficientFunds);
        assert_eq!(
            authorize(Some(&r), Funds::Available(150_000), 0),
            Grant::Allowed { max_duration_secs: 60, reserve_micros: 150_000 }
        );
        // One micro short of the second minute.
        assert_eq!(
            authorize(Some(&r), Funds::Available(249_999), 0),
            Grant::Allowed { max_duration_secs: 60, reserve_micros: 150_000 }
        );
        assert_eq!(
            authorize(Some(&r), Funds::Available(250_000), 0),
            Grant::Allowed { max_duration_secs: 120, reserve_micros: 250_000 }
        );
        assert_eq!(authorize(Some(&r), Funds::Available(-1), 0), Grant::InsufficientFunds);
    }

    #[test]
    fn exact_boundaries_per_second() {
        let r = rate(TEN_CENTS, 0, 1, 1);
        // 10 s cost exactly 16 667 (16 666.67 rounded up); one micro less buys 9 s.
        assert_eq!(r.price(10), 16_667);
        assert_eq!(
            authorize(Some(&r), Funds::Available(16_667), 0),
            Grant::Allowed { max_duration_secs: 10, reserve_micros: 16_667 }
        );
        assert_eq!(
            authorize(Some(&r), Funds::Available(16_666), 0),
            Grant::Allowed { max_duration_secs: 9, reserve_micros: 15_000 }
        );
        assert_eq!(authorize(Some(&r), Funds::Available(1_666), 0), Grant::InsufficientFunds);
    }

    #[test]
    fn cap_shorter_than_the_first_increment_still_reserves_the_increment() {
        let r = rate(TEN_CENTS, 0, 60, 60);
        assert_eq!(
            authorize(Some(&r), Funds::Available(1_000_000), 30),
            Grant::Allowed { max_duration_secs: 30, reserve_micros: 100_000 }
        );
    }

    #[test]
    fn plenty_of_funds_stop_at_the_ceiling() {
        let r = rate(1, 0, 1, 1);
        let grant = authorize(Some(&r), Funds::Available(money::MAX_AMOUNT_MICROS), 0);
        assert_eq!(
            grant,
            Grant::Allowed { max_duration_secs: FUNDED_CEILING_SECS, reserve_micros: 1_440 }
        );
    }

    #[test]
    fn unrated_and_unlimited_calls_get_the_cap_and_hold_nothing() {
        let r = rate(TEN_CENTS, 0, 60, 60);
        for grant in [
            authorize(None, Funds::Available(0), 3_600),
            authorize(Some(&r), Funds::Unlimited, 3_600),
        ] {
            assert_eq!(grant, Grant::Allowed { max_duration_secs: 3_600, reserve_micros: 0 });
        }
        assert_eq!(
            authorize(None, Funds::Available(-5), 0),
            Grant::Allowed { max_duration_secs: 0, reserve_micros: 0 }
        );
    }

    #[test]
    fn a_call_within_its_authorization_never_costs_more_than_was_reserved() {
        for r in [rate(TEN_CENTS, 0, 60, 60), rate(TEN_CENTS, 10_000, 1, 1), rate(77_777, 3, 30, 6)]
        {
            for available in [150_000, 999_999, 1_000_000, 4_321_987] {
                let Grant::Allowed { max_duration_secs, reserve_micros } =
                    authorize(Some(&r), Funds::Available(available), 0)
                else {
                    continue;
                };
                assert!(reserve_micros <= available, "{r:?} {available}");
                let full = r.charge(u64::from(max_duration_secs) * 1000).charge_micros;
                assert_eq!(full, reserve_micros, "{r:?} {available}");
                // One more second would not be affordable (or is beyond the ceiling).
                let over = r.charge((u64::from(max_duration_secs) + 1) * 1000).charge_micros;
                assert!(over > available, "{r:?} {available}: {over}");
            }
        }
    }

    #[test]
    fn a_call_cut_off_at_its_max_duration_costs_what_was_reserved() {
        let r = rate(TEN_CENTS, 0, 60, 60);
        assert_eq!(billable_ms(600_000, 600), 600_000);
        assert_eq!(billable_ms(600_001, 600), 600_000);
        assert_eq!(billable_ms(602_000, 600), 600_000);
        assert_eq!(r.charge(billable_ms(600_350, 600)).charge_micros, 1_000_000);
        // Not cut off: the true length.
        assert_eq!(billable_ms(602_001, 600), 602_001);
        assert_eq!(r.charge(billable_ms(602_001, 600)).charge_micros, 1_100_000);
        // No limit, or well within it.
        assert_eq!(billable_ms(600_001, 0), 600_001);
        assert_eq!(billable_ms(1_000, 600), 1_000);
    }

    #[test]
    fn longest_prefix_wins() {
        let mut plan = std::collections::BTreeMap::new();
        plan.insert("4", rate(1, 0, 1, 1));
        plan.insert("44", rate(2, 0, 1, 1));
        plan.insert("4420", rate(3, 0, 1, 1));
        let find = |dest: &str| best_match(dest, |p| plan.get(p).copied()).map(|(p, _)| p);
        assert_eq!(find("442071234567").as_deref(), Some("4420"));
        assert_eq!(find("4421").as_deref(), Some("44"));
        assert_eq!(find("45").as_deref(), Some("4"));
        assert_eq!(find("4").as_deref(), Some("4"));
        assert_eq!(find("33123"), None);
        assert_eq!(find("bob"), None);

        plan.insert(DEFAULT_PREFIX, rate(9, 0, 1, 1));
        let find = |dest: &str| best_match(dest, |p| plan.get(p).copied()).map(|(p, _)| p);
        assert_eq!(find("33123").as_deref(), Some(DEFAULT_PREFIX));
        assert_eq!(find("bob").as_deref(), Some(DEFAULT_PREFIX));
        assert_eq!(find("4420").as_deref(), Some("4420"));
    }

    #[test]
    fn destination_is_the_callee_user_without_plus() {
        assert_eq!(destination("+442071234567@sip.example.net"), "442071234567");
        assert_eq!(destination("alice@sip.example.net"), "alice");
        assert_eq!(destination("0044"), "0044");
        assert_eq!(candidate_prefixes("12a3"), ["12", "1", DEFAULT_PREFIX]);
        assert_eq!(candidate_prefixes(""), [DEFAULT_PREFIX]);
    }

    #[test]
    fn prefixes_increments_and_plan_names_as_typed() {
        assert_eq!(normalize_prefix("+44").expect("+44"), "44");
        assert_eq!(normalize_prefix("").expect("empty"), DEFAULT_PREFIX);
        assert_eq!(normalize_prefix("default").expect("default"), DEFAULT_PREFIX);
        assert!(normalize_prefix("4a").is_err());
        assert_eq!(parse_increments("60/60").expect("60/60"), (60, 60));
        assert_eq!(parse_increments("1").expect("1"), (1, 1));
        assert!(parse_increments("60/").is_err());
        assert!(rate(1, 0, 0, 1).validate().is_err());
        assert!(rate(1, 0, 1, 3_601).validate().is_err());
        assert!(rate(-1, 0, 1, 1).validate().is_err());
        assert!(rate(MAX_RATE_MICROS_PER_MINUTE + 1, 0, 1, 1).validate().is_err());
        assert!(rate(TEN_CENTS, 0, 30, 6).validate().is_ok());
        assert!(validate_plan_name("--name", "retail-2025.v1").is_ok());
        assert!(validate_plan_name("--name", "a b").is_err());
        assert!(validate_plan_name("--name", "").is_err());
    }
}
