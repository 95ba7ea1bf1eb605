//! Amounts of money as integer micro-units (`1.00` = 1 000 000), and their decimal text form.
//!
//! Billing never holds money in a float: balances, limits, rates and charges are `i64`
//! micro-units from the command line to Redis and back. Redis stores them as decimal integers
//! (`HINCRBY` works on them), and the Lua scripts compute with them exactly as long as they stay
//! below 2^53, which [`MAX_AMOUNT_MICROS`] guarantees for everything an operator can enter.

use crate::error::Error;

/// Micro-units in one unit of the currency.
pub const MICROS_PER_UNIT: i64 = 1_000_000;

/// Largest amount (in absolute value) an operator may enter or a top-up may produce:
/// 1 000 000 000.00. Sums of a few of these stay far below 2^53 ≈ 9.007e15, where the doubles
/// of Redis' Lua stop representing every integer.
pub const MAX_AMOUNT_MICROS: i64 = 1_000_000_000 * MICROS_PER_UNIT;

/// Decimal places of a micro-unit.
const DECIMALS: usize = 6;

/// Parses a decimal amount: an optional sign, digits, and optionally `.` with up to six
/// digits (`1`, `1.00`, `0.10`, `-5.5`, `.25`). No exponent, no thousands separator, no
/// currency sign: what is typed is exactly what is stored. `what` names the argument in the
/// error (e.g. `--balance`).
pub fn parse(what: &'static str, text: &str) -> Result<i64, Error> {
    let bad = |reason: &str| Error::InvalidInput { what, reason: format!("{text:?}: {reason}") };
    let (negative, unsigned) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    let (whole, fraction) = unsigned.split_once('.').unwrap_or((unsigned, ""));
    if whole.is_empty() && fraction.is_empty() {
        return Err(bad("expected an amount such as 1.00"));
    }
    if !whole.bytes().chain(fraction.bytes()).all(|b| b.is_ascii_digit()) {
        return Err(bad("expected digits with an optional sign and decimal point, e.g. -5.50"));
    }
    if fraction.len() > DECIMALS {
        return Err(bad("at most 6 decimal places (micro-units)"));
    }
    // Leading zeros are harmless; more than 10 significant whole digits is out of range anyway.
    let whole = whole.trim_start_matches('0');
    if whole.len() > 10 {
        return Err(bad(&format!("out of range (at most {})", format(MAX_AMOUNT_MICROS))));
    }
    let whole: i64 =
        if whole.is_empty() { 0 } else { whole.parse().map_err(|_| bad("out of range"))? };
    let mut micros_part: i64 = 0;
    for (i, digit) in fraction.bytes().enumerate() {
        micros_part +=
            i64::from(digit - b'0') * 10_i64.pow(u32::try_from(DECIMALS - 1 - i).unwrap_or(0));
    }
    let magnitude = whole * MICROS_PER_UNIT + micros_part;
    if magnitude > MAX_AMOUNT_MICROS {
        return Err(bad(&format!("out of range (at most {})", format(MAX_AMOUNT_MICROS))));
    }
    Ok(if negative { -magnitude } else { magnitude })
}

/// Formats micro-units as a decimal with at least two decimal places, and more only when
/// needed: `1000000` → `1.00`, `100000` → `0.10`, `-5500000` → `-5.50`, `1` → `0.000001`.
pub fn format(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let magnitude = micros.unsigned_abs();
    let per_unit = MICROS_PER_UNIT.unsigned_abs();
    let whole = magnitude / per_unit;
    let fraction = format!("{:06}", magnitude % per_unit);
    let fraction = fraction.trim_end_matches('0');
    let fraction = if fraction.len() < 2 { &format!("{fraction:0<2}") } else { fraction };
    format!("{sign}{whole}.{fraction}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_forms_an_operator_types() {
        let cases = [
            ("1", 1_000_000),
            ("1.00", 1_000_000),
            ("0.10", 100_000),
            ("-5.5", -5_500_000),
            ("+2.5", 2_500_000),
            (".25", 250_000),
            ("3.", 3_000_000),
            ("0.000001", 1),
            ("007.5", 7_500_000),
            ("1000000000", MAX_AMOUNT_MICROS),
            ("-1000000000.00", -MAX_AMOUNT_MICROS),
        ];
        for (text, micros) in cases {
            assert_eq!(parse("--amount", text).expect(text), micros, "{text}");
        }
    }

    #[test]
    fn refuses_what_is_not_an_exact_amount() {
        for text in [
            "",
            "-",
            ".",
            "1,00",
            "1e3",
            "0.0000001",
            "abc",
            "1.2.3",
            " 1",
            "--1",
            "1000000000.01",
            "99999999999",
        ] {
            assert!(parse("--amount", text).is_err(), "{text:?} should be refused");
        }
        let msg = parse("--balance", "1.2345678").expect_err("too precise").to_string();
        assert!(msg.contains("--balance") && msg.contains("6 decimal"), "{msg}");
    }

    #[test]
    fn formats_with_two_to_six_decimals() {
        let cases = [
            (0, "0.00"),
            (1_000_000, "1.00"),
            (100_000, "0.10"),
            (-5_500_000, "-5.50"),
            (1, "0.000001"),
            (-1, "-0.000001"),
            (1_234_500, "1.2345"),
            (i64::MIN, "-9223372036854.775808"),
        ];
        for (micros, text) in cases {
            assert_eq!(format(micros), text, "{micros}");
        }
    }

    #[test]
    fn format_then_parse_is_the_identity() {
        for micros in [0, 1, 99, 100_000, 1_000_000, -5_500_000, 123_456_789, MAX_AMOUNT_MICROS] {
            assert_eq!(parse("x", &format(micros)).expect("round trip"), micros);
        }
    }
}
