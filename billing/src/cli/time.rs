//! Times on the command line: `--since` / `--until` and the UTC column of `cdr list`, without
//! a date library (the proleptic Gregorian calendar in UTC is a few lines).

/// Parses milliseconds since the epoch, or a UTC date `YYYY-MM-DD`, optionally followed by
/// `THH:MM`, `THH:MM:SS` (or a space instead of `T`) and a `Z`.
pub fn parse(text: &str) -> Result<u64, String> {
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text.parse().map_err(|_| format!("{text:?}: out of range"));
    }
    let bad =
        || format!("{text:?}: expected ms since the epoch or a UTC date YYYY-MM-DD[THH:MM[:SS]]");
    let t = text.strip_suffix('Z').unwrap_or(text);
    let (date, clock) = match t.split_once(['T', ' ']) {
        Some((d, c)) => (d, Some(c)),
        None => (t, None),
    };
    let num = |s: &str, len: usize| -> Result<i64, String> {
        if s.len() != len || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        s.parse().map_err(|_| bad())
    };
    let mut d = date.split('-');
    let (Some(y), Some(m), Some(day), None) = (d.next(), d.next(), d.next(), d.next()) else {
        return Err(bad());
    };
    let (y, m, day) = (num(y, 4)?, num(m, 2)?, num(day, 2)?);
    if !(1..=12).contains(&m) || !(1..=days_in_month(y, m)).contains(&day) {
        return Err(bad());
    }
    let mut secs = days_from_civil(y, m, day) * 86_400;
    if let Some(clock) = clock {
        let mut c = clock.split(':');
        let (Some(h), Some(min)) = (c.next(), c.next()) else { return Err(bad()) };
        let s = c.next().unwrap_or("00");
        if c.next().is_some() {
            return Err(bad());
        }
        let (h, min, s) = (num(h, 2)?, num(min, 2)?, num(s, 2)?);
        if h > 23 || min > 59 || s > 59 {
            return Err(bad());
        }
        secs += h * 3_600 + min * 60 + s;
    }
    u64::try_from(secs * 1000).map_err(|_| format!("{text:?}: before 1970"))
}

/// `YYYY-MM-DD HH:MM:SS` in UTC.
pub fn format_utc(ms: u64) -> String {
    let secs = i64::try_from(ms / 1000).unwrap_or(i64::MAX);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}", rem / 3_600, rem % 3_600 / 60, rem % 60)
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 (H. Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The inverse of [`days_from_civil`].
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_epoch_milliseconds() {
        assert_eq!(parse("0"), Ok(0));
        assert_eq!(parse("1764244800000"), Ok(1_764_244_800_000));
        assert_eq!(parse("1970-01-01"), Ok(0));
        assert_eq!(parse("2025-11-27"), Ok(1_764_201_600_000));
        assert_eq!(parse("2025-11-27T12:00"), Ok(1_764_244_800_000));
        assert_eq!(parse("2025-11-27 12:00:00Z"), Ok(1_764_244_800_000));
        assert_eq!(parse("2024-02-29"), Ok(1_709_164_800_000));
        for bad in [
            "",
            "2025-02-29",
            "2025-13-01",
            "2025-1-01",
            "2025-11-27T24:00",
            "yesterday",
            "1969-12-31",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn utc_formatting_round_trips() {
        assert_eq!(format_utc(0), "1970-01-01 00:00:00");
        assert_eq!(format_utc(1_764_244_800_999), "2025-11-27 12:00:00");
        assert_eq!(format_utc(1_709_164_800_000), "2024-02-29 00:00:00");
        for ms in [0, 951_782_400_000, 1_709_164_800_000, 4_102_444_800_000] {
            assert_eq!(parse(&format_utc(ms)), Ok(ms));
        }
    }
}
