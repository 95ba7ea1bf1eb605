//! Waiting for a condition with a deadline: the only way the harness synchronises with the
//! processes it drives (never a fixed sleep).

use std::time::{Duration, Instant};

use anyhow::{Result, bail};

/// How long to pause between two checks of a polled condition. Short enough to add no visible
/// latency, long enough not to busy-spin on a 2-core machine.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Calls `check` until it returns `Some`, or fails naming `what` after `timeout`.
///
/// `check` returning `Err` aborts the wait at once (e.g. the process being waited for exited).
pub fn until<T>(
    what: &str,
    timeout: Duration,
    check: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    until_every(what, timeout, POLL_INTERVAL, check)
}

/// [`until`] with a chosen pause between checks, for checks that are costly themselves
/// (e.g. running a CLI).
pub fn until_every<T>(
    what: &str,
    timeout: Duration,
    interval: Duration,
    mut check: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check()? {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(interval);
    }
}
