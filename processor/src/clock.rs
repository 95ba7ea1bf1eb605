//! The wall clock, for what is stored or sent with a timestamp (binding expiry, dialog saves).

use std::time::{SystemTime, UNIX_EPOCH};

/// Wall clock in Unix milliseconds (0 before the epoch).
pub fn wall_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
