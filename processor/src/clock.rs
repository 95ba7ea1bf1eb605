//! The processor's two clocks: the monotonic one for timers, the wall one for what is stored
//! or sent with a timestamp (binding expiry, dialog saves, accounting).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Wall clock in Unix milliseconds (0 before the epoch).
pub fn wall_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Both clocks read at one moment. Every input of the core takes one, so a test drives both
/// from a virtual clock and they never disagree within one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// Monotonic time, for timers.
    pub mono: Instant,
    /// Wall clock, Unix milliseconds.
    pub wall_ms: u64,
}

impl Now {
    /// The clocks now.
    pub fn read() -> Self {
        Now { mono: Instant::now(), wall_ms: wall_ms() }
    }

    /// Both clocks `d` later.
    pub fn after(self, d: Duration) -> Self {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Now { mono: self.mono + d, wall_ms: self.wall_ms.saturating_add(ms) }
    }

    /// Both clocks at monotonic instant `at` (not before this one).
    pub fn at(self, at: Instant) -> Self {
        self.after(at.saturating_duration_since(self.mono))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_clocks_move_together() {
        let start = Now { mono: Instant::now(), wall_ms: 1_000 };
        let later = start.after(Duration::from_millis(1_500));
        assert_eq!(later.wall_ms, 2_500);
        assert_eq!(later.mono - start.mono, Duration::from_millis(1_500));
        assert_eq!(start.at(later.mono), later);
        // An instant in the past does not move the wall clock back.
        assert_eq!(later.at(start.mono), later);
    }
}
